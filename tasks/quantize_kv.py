"""Stage `quantize-kv`: give an MLA checkpoint an int4/int2 quantized latent cache (KIVI-style groups)."""

from __future__ import annotations

from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig
from infra.stage import RunLink, StageOutput, StageResult, artifact_key, stage_task
from tasks.inputs import checkpoint_dtype, load_checkpoint, save_checkpoint

STAGE = "quantize-kv"
PROBE_TOKENS = 1024  # context at which the cache's bytes/token are measured (beyond the residual window)


CORE = ("mha2mla_core.modeling.latent_cache", "mha2mla_core.modeling.modeling_mla", "mha2mla_core.hub_code")


@stage_task(STAGE, code=CORE, params=lambda config, **_: config.to_dict())
def quantize_kv(checkpoint: StageResult, slug: str, config: KVCacheQuantConfig, run: RunLink) -> StageOutput:
    """The same weights, saved with `kv_cache_quant` so every load builds a QuantizedLatentCache."""
    model, tokenizer = load_checkpoint(checkpoint, shared=False)
    model.config.kv_cache_quant = KVCacheQuantConfig.from_dict(config.to_dict()).to_dict()
    output = save_checkpoint(model, tokenizer, artifact_key(slug, STAGE, "model"), checkpoint_dtype(checkpoint))
    return StageOutput(output, metrics={"kv_bytes_per_token": model.kv_bytes_per_token(PROBE_TOKENS)})
