"""Conversion of a Llama-family MHA/GQA model to MLA: the config (`config`), the per-architecture table (`arch`),
partial and rotated RoPE (`rope`), the low-rank factorisation (`svd`), the calibration sample (`calibration`), the
layer-by-layer conversion (`convert`), and the DeepSeek-V3 export of a converted model (`export`).

Conversion builds `mha2mla_core.modeling` models and imports nothing from `mha2mla_core.training`.
"""

from mha2mla_core.conversion.calibration import CalibrationSample, default_calibration_texts, sample_calibration
from mha2mla_core.conversion.config import MLAConfig
from mha2mla_core.conversion.convert import ConversionReport, convert_to_mla, convert_to_mla_with_report, score_rope

__all__ = [
    "CalibrationSample",
    "ConversionReport",
    "MLAConfig",
    "convert_to_mla",
    "convert_to_mla_with_report",
    "default_calibration_texts",
    "sample_calibration",
    "score_rope",
]
