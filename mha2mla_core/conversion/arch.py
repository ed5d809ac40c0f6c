"""Which source architectures convert, and how their attention differs (one table, no per-model branches)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transformers import PretrainedConfig


@dataclass(frozen=True)
class ArchSpec:
    """How to read one source architecture's attention."""

    qkv_bias: Callable[[PretrainedConfig], bool]
    o_bias: Callable[[PretrainedConfig], bool]
    # returns a reason the config cannot convert, or None
    unsupported_reason: Callable[[PretrainedConfig], str | None] = lambda cfg: None


def _sliding_window_reason(cfg: PretrainedConfig) -> str | None:
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < cfg.max_position_embeddings:
        return (
            f"it uses sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={cfg.max_position_embeddings}), which the latent cache does not implement"
        )
    return None


ARCH_SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        qkv_bias=lambda c: bool(getattr(c, "attention_bias", False)),
        o_bias=lambda c: bool(getattr(c, "attention_bias", False)),
    ),
    "mistral": ArchSpec(qkv_bias=lambda c: False, o_bias=lambda c: False, unsupported_reason=_sliding_window_reason),
    "qwen2": ArchSpec(qkv_bias=lambda c: True, o_bias=lambda c: False, unsupported_reason=_sliding_window_reason),
}


def arch_spec(config: PretrainedConfig) -> ArchSpec:
    """The ArchSpec of `config`, or a ValueError naming the model_type and what is supported."""
    model_type = getattr(config, "model_type", None)
    spec = ARCH_SPECS.get(model_type)
    if spec is None:
        raise ValueError(
            f"model_type={model_type!r} is not supported for MLA conversion; supported: {sorted(ARCH_SPECS)} "
            "(Llama-family decoders with standard RoPE, MHA or GQA; SmolLM/SmolLM2 are 'llama'). "
            "Models with qk-norm, ALiBi, or sliding-window-only attention are not supported."
        )
    reason = spec.unsupported_reason(config)
    if reason:
        raise ValueError(f"model_type={model_type!r} cannot be converted: {reason}")
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"model_type={model_type!r} already uses partial RoPE (partial_rotary_factor); not supported")
    return spec
