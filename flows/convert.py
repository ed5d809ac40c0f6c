"""The `convert` flow: one model, one MLA config, stage by stage, each stage cached on its inputs' digests.

    sample-calibration -> score-rope (2-norm only) -> svd-init -> [finetune-data -> [reconstruct] -> finetune]
                                                               or [reconstruct] on the calibration windows
    -> [quantize-kv]
    -> [export] (DeepSeek-V3 format, of the last full-precision checkpoint, after the evaluations)
    evaluate[original], evaluate[mla], [evaluate[finetuned] or evaluate[reconstructed]], [evaluate[int4]]

One MLflow parent run per flow run (params = the resolved config, tags = model source and digest, code and
library versions; artifacts = `config.json`, the side-by-side evaluation table `eval_table.md` / `.json` and its
plots) and one nested run per stage, also for a stage served from the cache (tagged `mha2mla.cache=hit`). The
checkpoint is registered in the MLflow model registry (once per artifact URI). `config.json` holds the flow's
parameters, so `mha2mla resume RUN` reruns exactly this call; completed stages are cache hits.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from prefect import flow
from prefect.context import FlowRunContext
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.artifacts import MANIFEST_NAME, ArtifactRef, DigestMismatchError
from flows.naming import default_name
from flows.publish import QualityGate, RunSummary, headline_metrics, publish
from infra.tracking import (
    INTEGRITY_TAG, SUPERSEDED_TAG, log_json, log_metrics, mark_registered, model_version_of, model_versions,
    parent_run, registered_source, set_tags, settle_corrupt_versions,
)  # fmt: skip
from mha2mla_core import MLAConfig
from mha2mla_core.conversion.convert import check_convertible
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig
from mha2mla_core.training.config import ReconstructConfig
from infra.stage import RunLink, StageResult, context, ensure_result_storage, log_cache_hit
from tasks.evaluate import EvalParams, check_eval_inputs, evaluate, log_comparison
from tasks.export import ExportParams, check_export_inputs, export
from tasks.finetune import FinetuneParams, ReconstructParams, finetune, finetune_data, reconstruct
from tasks.inputs import (
    DEFAULT_CALIBRATION,
    DEFAULT_EVAL_TEXT,
    DataSource,
    ModelSource,
    load_model_config,
    model_slug,
    read_text,
    resolve_data,
    resolve_model,
    worker_device,
)
from tasks.quantize_kv import quantize_kv
from tasks.sample_calibration import CalibrationParams, sample_calibration
from tasks.score_rope import score_rope
from tasks.svd_init import svd_init

logger = logging.getLogger(__name__)
progress = logging.getLogger("mha2mla.progress")  # the CLI turns these records into a progress display

CONFIG_FILE = "config.json"
FLOW_TAG = "mha2mla.flow"


class ConvertParams(BaseModel):
    """Everything one conversion depends on; each knob has this one source."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # hub id, local HF directory, .gguf file, or `smollm2-135m`
    mla: MLAConfig = MLAConfig()
    calibration: CalibrationParams = CalibrationParams()
    evaluation: EvalParams = EvalParams()
    finetune: FinetuneParams | None = None  # None: no fine-tuning
    # without fine-tuning: block-wise reconstruction of the conversion on the calibration windows (the cpu recipe);
    # with fine-tuning, finetune.reconstruct runs on its rows instead
    reconstruct: ReconstructConfig | None = None
    quantize_kv: KVCacheQuantConfig | None = None  # None: the latent cache stays in the model's dtype
    export: ExportParams | None = None  # None: no DeepSeek-V3 export of the final checkpoint
    # MLflow run name, Prefect flow run name and registry model name
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # None: flows.naming.default_name
    gate: QualityGate | None = None  # a checkpoint that passes becomes the registered model's `champion`

    @model_validator(mode="after")
    def _one_reconstruction(self) -> ConvertParams:
        if self.reconstruct is not None and self.finetune is not None:
            raise ValueError("reconstruct (top level) fits a conversion that is not fine-tuned; with fine-tuning "
                             "set finetune.reconstruct, which runs on the training rows")  # fmt: skip
        return self


class ConvertOutcome(BaseModel):
    run_id: str  # MLflow parent run
    checkpoint: ArtifactRef
    model_version: str  # "registry name/version"
    table: dict  # side-by-side evaluation (Comparison JSON): a row per metric, a value and delta per model
    cache: dict[str, str]  # stage run name -> "hit" | "miss"
    export: ArtifactRef | None = None  # the DeepSeek-V3 directory, when params.export


class StageRunner:
    """Runs stage tasks under one parent MLflow run; a cache hit gets its own nested run too."""

    def __init__(self, parent_run_id: str):
        self.parent_run_id, self.cache = parent_run_id, {}
        self.seconds: dict[str, float] = {}  # stage run name -> wall time
        self.results: dict[str, StageResult] = {}  # stage name -> its last result

    def __call__(self, stage, *args, label: str = "", **kwargs) -> StageResult:
        link = RunLink(parent_run_id=self.parent_run_id, label=label)
        name = link.run_name(stage.name)
        progress.info("%s started", name, extra={"stage": name, "event": "start"})
        start = time.monotonic()
        state = stage.with_options(task_run_name=name)(*args, run=link, return_state=True, **kwargs)
        self.seconds[name] = time.monotonic() - start
        if state.is_failed() or state.is_crashed():
            progress.info("%s failed", name, extra={"stage": name, "event": "failed"})
        result: StageResult = state.result()  # raises the stage's error
        self.results[stage.name] = result
        self.cache[name] = "hit" if state.name == "Cached" else "miss"
        if self.cache[name] == "hit":
            log_cache_hit(result, link)
        progress.info("%s %s", name, self.cache[name], extra={"stage": name, "event": self.cache[name]})
        return result


def registry_name(params: ConvertParams, slug: str) -> str:
    return default_name(params, slug)


def flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow run's (model and config), not a random pair of words."""
    from prefect.runtime import flow_run

    params = ConvertParams.model_validate(flow_run.parameters["params"])
    return registry_name(params, model_slug(params.model))


def register_once(name: str, final: StageResult, **publishing) -> str:
    """Register `final` as a version of `name` (`flows.publish.publish`: once per checkpoint); "name/version".
    Versions of `name` marked corrupt are settled against it (`tracking.settle_corrupt_versions`)."""
    versions = model_versions(name)
    number = publish(name, final, **publishing).version
    settle_corrupt_versions(versions, number, final.output)
    return f"{name}/{number}"


def registered_checkpoint(model_version: str) -> ArtifactRef:
    """The checkpoint of a registered "name/version", every stored byte verified against the digest it was
    registered with; DigestMismatchError when it changed or was marked corrupt (naming its replacement)."""
    name, _, number = model_version.rpartition("/")
    version = model_version_of(name, number)
    if INTEGRITY_TAG in version.tags:
        instead = version.tags.get(SUPERSEDED_TAG, "none yet: run the conversion again")
        raise DigestMismatchError(f"registered model {model_version} is marked {version.tags[INTEGRITY_TAG]}; "
                                  f"use the version registered in its place: {instead}")  # fmt: skip
    store, (uri, sha256) = context().store, registered_source(version)
    try:
        files = store.get_json(f"{uri}/{MANIFEST_NAME}", sha256=sha256)["files"]
        ref = ArtifactRef(uri=uri, sha256=sha256, size=sum(f["size"] for f in files.values()), kind="dir")
        intact = store.verify(ref)
    except (DigestMismatchError, FileNotFoundError):
        intact = False
    if not intact:
        mark_registered(uri, f"corrupt: {uri} no longer hashes to {sha256}")
        raise DigestMismatchError(f"registered model {model_version}: the files at {uri} no longer hash to the "
                                  "digest it was registered with (now tagged mha2mla.integrity); run the conversion "
                                  "again", uri=uri, expected=sha256)  # fmt: skip
    return ref


def check_inputs(params: ConvertParams, model: ModelSource, eval_text: DataSource) -> None:
    """Before any stage: the MLA config fits the model (the core's own checks, against the model's config) and
    the evaluation text has text in it."""
    check_convertible(load_model_config(model), params.mla)
    if params.export:
        check_export_inputs(load_model_config(model), params.mla, params.export)
    if Path(eval_text.source).is_file() and not read_text(eval_text).strip():
        raise ValueError(f"evaluation text {eval_text.source} is empty; give --eval-text a file with text in it")


@flow(name="convert", flow_run_name=flow_run_name, persist_result=False)
def convert(params: ConvertParams, catalog_run_id: str | None = None) -> ConvertOutcome:
    """Convert `params.model` to MLA, evaluate it against the original, register the checkpoint."""
    settings = context().settings  # the artifact store and tracking server are reachable
    worker_device(settings.device)  # a worker told to use a device it lacks fails before any stage
    ensure_result_storage()
    model = resolve_model(params.model)
    calib_data = resolve_data(params.calibration.data, DEFAULT_CALIBRATION)
    eval_text = resolve_data(params.evaluation.text, DEFAULT_EVAL_TEXT)
    train_data = resolve_data(params.finetune.data, DEFAULT_CALIBRATION) if params.finetune else None
    check_eval_inputs(model, params.evaluation)
    check_inputs(params, model, eval_text)
    flow_run = FlowRunContext.get().flow_run
    tags = {FLOW_TAG: "convert", "mha2mla.model_source": model.name, "mha2mla.model_digest": model.digest,
            "mha2mla.prefect_flow_run": str(flow_run.id)}  # fmt: skip
    if catalog_run_id:
        tags["mha2mla.catalog_run"] = catalog_run_id
    name = registry_name(params, model.slug)
    with parent_run(name, params=params.model_dump(mode="json"), tags=tags) as run_id:
        sources = {"model": model.model_dump(), "calibration": calib_data.model_dump(), "eval_text": eval_text.model_dump()}
        log_json({"flow": "convert", "params": params.model_dump(mode="json"), "sources": sources}, CONFIG_FILE)
        stage = StageRunner(run_id)
        seq_len = params.mla.calib_seq_len
        calib = stage(sample_calibration, model, calib_data, params.calibration, seq_len)
        scores = stage(score_rope, model, calib, seq_len) if params.mla.rope_strategy == "2-norm" else None
        checkpoints = {"mla": stage(svd_init, model, calib, scores, params.mla)}
        if params.finetune:
            rows = stage(finetune_data, model, train_data, params.finetune.rows())
            start = checkpoints["mla"]
            if recon := params.finetune.reconstruction():
                start = stage(reconstruct, model, start, rows, recon)
            checkpoints["finetuned"] = stage(finetune, model, start, rows, params.finetune)
        elif params.reconstruct:
            recon = ReconstructParams(config=params.reconstruct, tokens=params.calibration.num_tokens, seq_len=seq_len)
            checkpoints["reconstructed"] = stage(reconstruct, model, checkpoints["mla"], calib, recon)
        if params.quantize_kv:
            last = list(checkpoints.values())[-1]
            checkpoints[f"int{params.quantize_kv.nbits}"] = stage(quantize_kv, last, model.slug, params.quantize_kv)
        before = stage(evaluate, model, model.slug, eval_text, params.evaluation, label="original")
        after = {label: stage(evaluate, ckpt, model.slug, eval_text, params.evaluation, label=label)
                 for label, ckpt in checkpoints.items()}  # fmt: skip
        comparison = log_comparison(before, after)
        exported = None
        if params.export:  # the last full-precision checkpoint; a quantized cache is our own class's
            label = next(label for label in ("finetuned", "reconstructed", "mla") if label in checkpoints)
            exported = stage(export, checkpoints[label], model, calib, after[label].metrics, params.export).output
        table = json.loads(comparison.to_json())
        final = list(checkpoints.values())[-1]
        headline = headline_metrics(comparison, stage.results, stage.seconds)
        log_metrics(headline)
        failures = params.gate.failures(headline) if params.gate else ["no quality gate set"]
        set_tags({"mha2mla.gate": "passed" if not failures else "; ".join(failures)})
        summary = RunSummary(name, params, model, comparison, headline, stage.results, run_id)
        version = register_once(name, final, summary=summary, champion=not failures)
    return ConvertOutcome(run_id=run_id, checkpoint=final.output, model_version=version, table=table, cache=stage.cache,
                          export=exported)
