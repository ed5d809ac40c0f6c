"""Stage `export`: an MLA checkpoint written in DeepSeek-V3's format, which vLLM, SGLang, llama.cpp and TensorRT-LLM
serve (`mha2mla_core.conversion.export`); its logits are checked against the checkpoint's on calibration tokens."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mha2mla_core.conversion.config import MLAConfig
from mha2mla_core.conversion.export import check_engine_layout, deepseek_config, export_deepseek_v3, write_model_card
from infra.settings import Settings
from infra.stage import RunLink, StageOutput, StageResult, artifact_key, context, scratch_dir, stage_task
from tasks.inputs import ModelSource, load_checkpoint, load_tensors

STAGE = "export"


class ExportParams(BaseModel):
    """Which engine the export must run on, how many calibration tokens check it, the block size its cached rows are
    padded to (32: llama.cpp's quantized cache types, `-ctk q8_0`) and whether its latent is turned for them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["hf", "llamacpp", "vllm", "trtllm"] = "hf"  # vllm/trtllm: only layouts their MLA kernels run
    check_tokens: int = Field(512, ge=0)  # 0: no logits check
    kv_block: int = Field(1, ge=1)  # 1: no padding; 32: the RoPE key padded so that each cached row is whole blocks
    rotate_latent: bool = True  # the latent turned (exactly) so that its channels are alike in scale: quantized caches


def engine_options(params: ExportParams) -> dict:
    """`export_deepseek_v3`'s keyword arguments from the export params (all but check_tokens)."""
    return params.model_dump(exclude={"check_tokens"})


def check_export_inputs(source_config, mla: MLAConfig, params: ExportParams) -> None:
    """Before any stage: the conversion `mla` of a model with `source_config` has an exact DeepSeek-V3 form that
    `params.target` runs (the export's own checks, on the config the conversion will produce)."""
    from mha2mla_core.conversion.convert import check_convertible, mla_config_from

    if mla.rope_strategy != "rotated" or mla.rope_window is not None:
        raise ValueError(
            f"an export needs rotated RoPE on the fastest frequencies (rope_strategy='rotated', no rope_window); "
            f"this conversion has rope_strategy={mla.rope_strategy!r}, rope_window={mla.rope_window}"
        )
    config = mla_config_from(source_config, mla, check_convertible(source_config, mla))
    deepseek_config(config, params.target, params.kv_block)
    check_engine_layout(config, params.target, params.kv_block)


@stage_task(STAGE, code=("mha2mla_core.conversion.export", "mha2mla_core.modeling.modeling_mla"), params=lambda params, **_: params.model_dump())
def export(
    checkpoint: StageResult, model: ModelSource, calibration: StageResult, quality: dict, params: ExportParams, run: RunLink
) -> StageOutput:
    """The DeepSeek-V3 directory (config, safetensors, tokenizer, model card with the source, `quality` and the
    export's own measurements)."""
    mla, tokenizer = load_checkpoint(checkpoint)
    if mla.dtype == torch.float16:  # a GPU worker holds an fp16 source's checkpoint in fp16, which the export refuses
        mla = copy.deepcopy(mla).float()
    calib_ids = load_tensors(calibration)["input_ids"][: params.check_tokens] if params.check_tokens else None
    with scratch_dir() as tmp:
        summary = export_deepseek_v3(mla, tmp / "model", tokenizer, calib_ids, **engine_options(params))
        source = {"name": model.name, "sha256": model.digest}
        write_model_card(tmp / "model", summary, mla.config, source=source, quality=quality)
        output = context().store.put_dir(tmp / "model", artifact_key(model.slug, STAGE, "model"), move=True)
    figures = {**summary, **summary.get("measured", {})}
    metrics = {k: float(v) for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageOutput(output, metrics=metrics)


def export_checkpoint(checkpoint: str, out: Path, params: ExportParams, settings: Settings) -> dict:
    """`mha2mla export`: a converted checkpoint (a local folder, or a models:/ or artifact URI of this store) written
    to `out` in DeepSeek-V3's format, its logits checked on the packaged calibration text. Returns the summary."""
    from mha2mla_core import default_calibration_texts, load_model, sample_calibration

    with tempfile.TemporaryDirectory(prefix="mha2mla-export-") as tmp:
        model, tokenizer = load_model(str(local_checkpoint(checkpoint, Path(tmp), settings)))
    calib_ids = None
    if params.check_tokens:
        sample = sample_calibration(default_calibration_texts(), tokenizer, params.check_tokens)
        calib_ids = sample.input_ids
    return export_deepseek_v3(model, out, tokenizer, calib_ids, **engine_options(params))


def local_checkpoint(checkpoint: str, tmp: Path, settings: Settings) -> Path:
    """A local folder as it is; a models:/ or artifact URI downloaded from the store of `settings`, every file's
    digest checked."""
    if Path(checkpoint).is_dir():
        return Path(checkpoint)
    from infra.artifacts import open_store
    from infra.tracking import configure, lineage

    configure(settings, create=False)
    store = open_store(settings.artifact_root, settings)
    found = lineage(checkpoint, root=store.root)
    uri = store.uri(found.key) if found.key else found.uri  # in this store, wherever it was when written
    return store.get_dir(uri, tmp / "model", sha256=found.sha256)
