"""Decode kernels for absorbed latent attention (Triton on CUDA, plain torch elsewhere)."""

from mha2mla_core.kernels.latent_decode import (
    grouped_query_decode,
    latent_decode_attention,
    latent_decode_attention_quantized,
    latent_decode_attention_reference,
    triton_available,
)
from mha2mla_core.kernels.quant_codes import GroupQuant, QuantizedLatentKV, dequantize_group

__all__ = [
    "GroupQuant",
    "QuantizedLatentKV",
    "dequantize_group",
    "grouped_query_decode",
    "latent_decode_attention",
    "latent_decode_attention_quantized",
    "latent_decode_attention_reference",
    "triton_available",
]
