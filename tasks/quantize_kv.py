"""Stage `quantize-kv`: give an MLA checkpoint an int4/int2 quantized latent cache (KIVI-style groups)."""

from __future__ import annotations

from infra.tracking import stage_run
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig
from tasks.common import RunLink, StageResult, artifact_key, finish_stage, stage_task
from tasks.inputs import load_checkpoint, save_checkpoint

STAGE = "quantize-kv"
PROBE_TOKENS = 1024  # context at which the cache's bytes/token are measured (beyond the residual window)


@stage_task(STAGE, code=("mha2mla_core.modeling.latent_cache", "mha2mla_core.modeling.modeling_mla", "mha2mla_core.hub_code"))
def quantize_kv(checkpoint: StageResult, slug: str, config: KVCacheQuantConfig, run: RunLink) -> StageResult:
    """The same weights, saved with `kv_cache_quant` so every load builds a QuantizedLatentCache."""
    with stage_run(run.run_name(STAGE), config.to_dict(), parent_run_id=run.parent_run_id):
        model, tokenizer = load_checkpoint(checkpoint, shared=False)
        model.config.kv_cache_quant = KVCacheQuantConfig.from_dict(config.to_dict()).to_dict()
        output = save_checkpoint(model, tokenizer, artifact_key(slug, STAGE, "model"))
        metrics = {"kv_bytes_per_token": model.kv_bytes_per_token(PROBE_TOKENS)}
        return finish_stage(STAGE, output, params=config.to_dict(), metrics=metrics)
