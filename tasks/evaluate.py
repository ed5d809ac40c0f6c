"""Stage `evaluate`: one model's figures on the enabled suites, and the side-by-side table of a flow's models.

Always: perplexity of a held-out text and KV-cache bytes per token read from the cache's own tensors. On
request (EvalParams): zero-shot multiple choice through lm-eval on the local task files, needle-in-a-haystack
retrieval (with a heatmap PNG), and prefill / decode tokens/s and peak memory at several context lengths and
batch sizes. The evaluation is mha2mla_core.evaluation's; this module maps the pipeline's parameters onto its
configs, stores the results and logs them.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from infra.artifacts import ArtifactRef, sha256_file
from infra import tracking
from mha2mla_core.evaluation import plots
from mha2mla_core.evaluation.inference import InferenceConfig
from mha2mla_core.evaluation.multiple_choice import TASK_FILES, MCConfig, short_task_name
from mha2mla_core.evaluation.needle import NeedleConfig
from mha2mla_core.evaluation.perplexity import PerplexityConfig
from mha2mla_core.evaluation.report import Comparison, EvalResult, compare, flat_metrics
from mha2mla_core.evaluation.suite import EvalConfig, check_files, check_lengths, data_files, evaluate_model
from infra.stage import RunLink, StageOutput, StageResult, artifact_key, context, scratch_dir, stage_task
from tasks.inputs import (
    DataSource, ModelSource, load_model_config, load_model_input, on_device, read_text, worker_device,
)

STAGE = "evaluate"
CODE = tuple(f"mha2mla_core.evaluation.{m}" for m in ("suite", "perplexity", "multiple_choice", "needle",
             "inference", "report", "plots")) + ("mha2mla_core.modeling.modeling_mla",)  # fmt: skip
KNOWN_TASKS = ", ".join(TASK_FILES)
GPU_MC_BATCH_SIZE = 64  # lm-eval requests a forward pass scores on a GPU worker (MCConfig's default on a CPU)


class NeedleParams(BaseModel):
    """The needle-in-a-haystack grid of NeedleConfig, the haystack as one local file. Its grid is the pipeline's
    CPU-sized one, not the core's larger default (1024...8000 tokens, 5 depths, 2 trials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lengths: tuple[int, ...] = (512, 1024, 2048)  # prompt tokens
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)  # where the needle sits: 0 = first, 1 = last in the haystack
    trials: int = 1  # passkeys per (length, depth) cell
    haystack: str | None = None  # a local text file; None = the package's books (mha2mla_core/resources)

    @model_validator(mode="after")
    def _valid(self) -> NeedleParams:
        self.core()  # NeedleConfig's checks, with its messages
        return self

    def core(self) -> NeedleConfig:
        paths = (Path(self.haystack),) if self.haystack else ()
        return NeedleConfig(haystack_paths=paths, lengths=self.lengths, depths=self.depths, trials=self.trials)


class EvalParams(BaseModel):
    """The held-out text and how much of it is scored; the optional suites (all off by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None  # local file, s3:// URI or HF dataset id; None = the packaged held-out books
    max_tokens: int = Field(4096, ge=2)  # first tokens of the tokenized text scored
    window: int = Field(512, ge=1)  # context per prediction; non-overlapping blocks of predicted tokens
    kv_probe_tokens: int = Field(1024, ge=1)  # context at which KV bytes/token are read from the cache
    mc_tasks: tuple[str, ...] = ()  # zero-shot multiple choice (lm-eval, local files): KNOWN_TASKS or "all"
    mc_limit: int | None = None  # items per task (per subject for MMLU); None = every item
    mc_data_dir: str | None = None  # the normalized MC JSONL files; None = shared/data/mc
    needle: NeedleParams | None = None  # None = no needle test
    speed: InferenceConfig | None = None  # prefill / decode tokens/s and peak memory grid; None = none

    @field_validator("mc_tasks")
    @classmethod
    def _known_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        if tasks == ("all",):
            return tuple(TASK_FILES)
        return tuple(dict.fromkeys(short_task_name(t) for t in tasks))  # raises naming the known tasks

    @field_validator("mc_limit")
    @classmethod
    def _positive_limit(cls, limit: int | None) -> int | None:
        if limit is not None and limit < 1:
            raise ValueError(f"mc_limit={limit}: give at least 1 item per task, or leave it out to score every item")
        return limit

    @model_validator(mode="after")
    def _tasks_for_mc_options(self) -> EvalParams:
        if not self.mc_tasks and (self.mc_limit is not None or self.mc_data_dir is not None):
            raise ValueError(f"mc_limit / mc_data_dir are set but mc_tasks is empty; name the tasks to score "
                             f"(--mc-tasks arc_easy,piqa), from: {KNOWN_TASKS}, or all")  # fmt: skip
        return self

    def cache_token(self) -> dict:
        """What the stage's cache key hashes: these parameters and the content of the MC and haystack files they
        read, so that editing a data file reruns the stage."""
        files = {str(path): sha256_file(path)[0] for path in data_files(self.suite()) if path.is_file()}
        return {**self.model_dump(mode="json"), "data_sha256": files}

    def suite(self, mc_batch_size: int = MCConfig.batch_size) -> EvalConfig:
        """The core config; the perplexity text itself is passed to evaluate_model by the stage. `mc_batch_size`
        is how many lm-eval requests a forward pass scores: the stage's device decides it, not the results."""
        data = {"data_dir": Path(self.mc_data_dir)} if self.mc_data_dir else {}
        return EvalConfig(
            perplexity=PerplexityConfig(window=self.window, max_tokens=self.max_tokens),
            multiple_choice=(MCConfig(tasks=self.mc_tasks, limit=self.mc_limit, batch_size=mc_batch_size, **data)
                             if self.mc_tasks else None),
            needle=self.needle.core() if self.needle else None,
            inference=self.speed,
            kv_probe_tokens=self.kv_probe_tokens,
        )


def check_eval_inputs(model: ModelSource, config: EvalParams) -> None:
    """Before any stage: the suites' data files exist and their lengths fit the model (read from its config,
    only when the needle or speed suite is on)."""
    suite = config.suite()
    check_files(suite, perplexity_file=False)
    if suite.needle or suite.inference:
        check_lengths(load_model_config(model), suite)


@stage_task(STAGE, code=CODE, params=lambda config, text, **_: {**config.model_dump(mode="json"), "source": text.source})
def evaluate(model: ModelSource | StageResult, slug: str, text: DataSource, config: EvalParams, run: RunLink) -> StageOutput:
    """PPL (fp32 logits) of the first `max_tokens` tokens of `text`, measured KV bytes/token, and the enabled
    suites, on the worker's device; the full result as JSON, the needle heatmap as PNG, every figure as a metric."""
    device = worker_device(context().settings.device)
    network, tokenizer = load_model_input(model)
    network = on_device(network, device)
    held_out = read_text(text)
    suite = config.suite(mc_batch_size=GPU_MC_BATCH_SIZE if device.type == "cuda" else MCConfig.batch_size)
    result = evaluate_model(network, tokenizer, suite, run.label or "model", perplexity_text=held_out)
    output, files = store_result(result, slug)
    return StageOutput(output, files=files, metrics=flat_metrics(result))


def store_result(result: EvalResult, slug: str) -> tuple[ArtifactRef, dict[str, ArtifactRef]]:
    """The result as JSON (`EvalResult.from_json` reads it back), and its needle heatmap where the test ran."""
    store = context().store
    output = store.put_bytes(result.to_json().encode(), artifact_key(slug, STAGE, f"{result.name}.json"))
    files = {}
    if result.needle:
        name = f"needle_{result.name}.png"
        png = plots.needle_heatmap(result.needle, f"needle: {result.name}")
        files[name] = store.put_bytes(png, artifact_key(slug, STAGE, name))
    return output, files


def load_result(result: StageResult) -> EvalResult:
    return EvalResult.from_json(context().store.get_bytes(result.uri, sha256=result.sha256).decode())


def log_comparison(original: StageResult, candidates: dict[str, StageResult]) -> Comparison:
    """The side-by-side table of the original and each candidate (deltas against the original), logged to the
    active run as eval_table.md / eval_table.json with the KV-cache plot and, where speed ran, decode speed."""
    results = {"original": load_result(original), **{label: load_result(r) for label, r in candidates.items()}}
    table = compare(results, baseline="original")
    tracking.log_text(table.to_markdown(), "eval_table.md")
    tracking.log_json(json.loads(table.to_json()), "eval_table.json")
    figures = {"kv_cache.png": plots.kv_cache(results)}
    if any(r.inference for r in results.values()):
        figures["decode_speed.png"] = plots.decode_speed(results)
    with scratch_dir() as tmp:
        for name, png in figures.items():
            (tmp / name).write_bytes(png)
            tracking.log_file(tmp / name)
    return table
