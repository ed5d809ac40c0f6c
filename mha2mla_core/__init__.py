"""mha2mla core: convert Llama-family MHA/GQA models to multi-head latent attention (pure torch/transformers)."""

from mha2mla_core.conversion.calibration import CalibrationSample, default_calibration_texts, sample_calibration
from mha2mla_core.conversion.config import MLAConfig
from mha2mla_core.conversion.convert import ConversionReport, convert_to_mla, convert_to_mla_with_report, score_rope
from mha2mla_core.loading import load_model
from mha2mla_core.modeling.decoding import generate_static
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig, LatentCache, QuantizedLatentCache, StaticLatentCache
from mha2mla_core.modeling.modeling_mla import MLAAttention, MLAForCausalLM, MLALlamaConfig

__version__ = "0.1.0"

__all__ = [
    "CalibrationSample",
    "ConversionReport",
    "KVCacheQuantConfig",
    "LatentCache",
    "MLAAttention",
    "MLAConfig",
    "MLAForCausalLM",
    "MLALlamaConfig",
    "QuantizedLatentCache",
    "StaticLatentCache",
    "convert_to_mla",
    "convert_to_mla_with_report",
    "default_calibration_texts",
    "generate_static",
    "load_model",
    "sample_calibration",
    "score_rope",
]
