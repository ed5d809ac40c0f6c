"""The MLA model (`modeling_mla`), its latent KV caches (`latent_cache`) and CUDA-graph decoding (`decoding`).

`modeling_mla` and the modules it imports are the code a checkpoint carries (`mha2mla_core.hub_code`): they import
torch, transformers and `mha2mla_core.kernels` only, and each other by module, never through this package.
"""

from mha2mla_core.modeling.decoding import generate_static
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig, LatentCache, QuantizedLatentCache, StaticLatentCache
from mha2mla_core.modeling.modeling_mla import MLA_MODEL_TYPE, MLAAttention, MLAForCausalLM, MLALlamaConfig

__all__ = [
    "KVCacheQuantConfig",
    "LatentCache",
    "MLAAttention",
    "MLAForCausalLM",
    "MLALlamaConfig",
    "MLA_MODEL_TYPE",
    "QuantizedLatentCache",
    "StaticLatentCache",
    "generate_static",
]
