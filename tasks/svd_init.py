"""Stage `svd-init`: convert the source model to MLA (partial RoPE + SVD-initialised latent) and save it."""

from __future__ import annotations

from mha2mla_core import MLAConfig
from mha2mla_core.conversion.convert import convert_to_mla_with_report
from infra.stage import RunLink, StageOutput, StageResult, artifact_key, context, stage_task
from tasks.inputs import ModelSource, load_source, load_tensors, save_checkpoint, source_dtype, worker_device
from tasks.plots import svd_spectrum

STAGE = "svd-init"
CORE = ("mha2mla_core.conversion.convert", "mha2mla_core.conversion.rope", "mha2mla_core.conversion.svd", "mha2mla_core.conversion.arch",
        "mha2mla_core.conversion.config", "mha2mla_core.modeling.modeling_mla", "mha2mla_core.hub_code")  # fmt: skip


@stage_task(STAGE, code=CORE, params=lambda config, **_: config.to_dict())
def svd_init(model: ModelSource, calibration: StageResult, scores: StageResult | None, config: MLAConfig, run: RunLink) -> StageOutput:
    """The converted model directory (safetensors + config + tokenizer); `scores` is needed for 2-norm."""
    source, tokenizer = load_source(model)
    device = worker_device(context().settings.device)
    rope_scores = load_tensors(scores)["scores"] if scores is not None else None
    calib_ids = load_tensors(calibration)["input_ids"]
    # on a GPU worker, a copy of one layer at a time runs there: the source stays in host memory, once, and the
    # converted model is built beside it (sharing its embeddings, MLPs and norms)
    mla, report = convert_to_mla_with_report(source, config, calib_ids, rope_scores,
                                             device=None if device.type == "cpu" else device)  # fmt: skip
    output = save_checkpoint(mla, tokenizer, artifact_key(model.slug, STAGE, "model"), source_dtype(model))
    rank = mla.config.kv_lora_rank if config.kv_rank is not None else None
    spectrum = svd_spectrum(report.spectra, rank * mla.config.kv_latent_groups if rank else None)
    plot = context().store.put_bytes(spectrum, artifact_key(model.slug, STAGE, "svd_spectrum.png"))
    metrics = {"convert_seconds": report.seconds, "kv_bytes_per_token": mla.kv_bytes_per_token()}
    return StageOutput(output, files={"svd_spectrum.png": plot}, metrics=metrics)
