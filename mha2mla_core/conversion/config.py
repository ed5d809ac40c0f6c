"""Conversion config: how a pretrained MHA/GQA model becomes an MLA model.

Legend used across the core: B batch, T tokens, H query heads, Hkv key/value heads, D head dim,
Dr kept RoPE dims per head (`rope_dims`), Dn = D - Dr non-RoPE key dims, R latent rank per KV head
(`kv_rank`), Hc latent groups (Hkv for the per-head layout, 1 for the shared one), Rc = R * Hkv / Hc latent dims
per group. One name per quantity: `kv_rank` is R (this config, the CLI, run names), `kv_lora_rank` is Rc and
`kv_latent_groups` Hc (the model's config, the attention, DeepSeek's format).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

RopeStrategy = Literal["high", "low", "uniform", "2-norm", "rotated"]
SvdMethod = Literal["split", "joint", "aware", "output-aware"]
Layout = Literal["per_head", "shared"]

ROPE_STRATEGIES: tuple[str, ...] = ("high", "low", "uniform", "2-norm", "rotated")
SVD_METHODS: tuple[str, ...] = ("split", "joint", "aware", "output-aware")
LAYOUTS: tuple[str, ...] = ("per_head", "shared")


@dataclass(frozen=True)
class MLAConfig:
    """What to keep of RoPE and how to factor keys/values into a latent.

    Cache per token per layer: Hkv * (rope_dims + kv_rank) values instead of 2 * Hkv * D.
    """

    # partial RoPE: keep RoPE on `rope_dims` of each head's D dims (rope_dims / 2 frequency pairs); "rotated" spends
    # the same budget, Hkv * rope_dims dims, on ONE RoPE key shared by all query heads (mixes of the KV heads' pairs).
    # None: "rotated" with the shared latent (best measured, see README), "2-norm" with per-head latents
    rope_strategy: RopeStrategy | None = None
    rope_dims: int = 8
    # rotated: every layer keeps the first component of the fastest rope_dims * Hkv / 2 frequencies, i.e. ordinary
    # RoPE on one shared key, the layout of DeepSeek's format that serving engines run (`mha2mla export`). A window
    # instead ranks each layer's (frequency, component) slots by their energy times what losing the rotation costs
    # over that many tokens (`mha2mla_core.conversion.rope.rotation_loss`): as good after fine-tuning, but not exportable
    rope_window: int | None = None
    # low-rank latent: rank per KV head (the paper's d_kv); None = partial RoPE only, no low rank
    kv_rank: int | None = 16
    svd: SvdMethod = "output-aware"  # see README: best zero-shot start measured on SmolLM2-135M
    # per_head: one latent of kv_rank per KV head (the paper); shared: one latent of kv_rank * Hkv (DeepSeek)
    layout: Layout = "shared"
    # after factoring, re-solve each KV head's value up-projection by least squares under the converted layer's own
    # attention weights (`mha2mla_core.conversion.refit`); with a low-rank latent only. Off by default: it improves
    # the conversion alone (zero-shot PPL -34 to -40%) but training after it recovers less (docs/RESULTS.md)
    refit_values: bool = False
    # calibration activations are computed on sequences of this many tokens
    calib_seq_len: int = 512

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} is unknown; use one of {LAYOUTS}")
        if self.rope_strategy is None:
            object.__setattr__(self, "rope_strategy", "rotated" if self.layout == "shared" else "2-norm")
        if self.rope_strategy not in ROPE_STRATEGIES:
            raise ValueError(f"rope_strategy={self.rope_strategy!r} is unknown; use one of {ROPE_STRATEGIES}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd={self.svd!r} is unknown; use one of {SVD_METHODS}")
        if self.rope_dims < 2 or self.rope_dims % 2:
            raise ValueError(
                f"rope_dims={self.rope_dims} must be an even number >= 2 (RoPE rotates dims in pairs); "
                f"use e.g. rope_dims={max(2, self.rope_dims + self.rope_dims % 2)}"
            )
        if self.kv_rank is not None and self.kv_rank <= 0:
            raise ValueError(f"kv_rank={self.kv_rank} must be a positive rank per KV head, or None for no low rank")
        if self.kv_rank is not None and self.svd == "split" and self.kv_rank % 2:
            raise ValueError(
                f"kv_rank={self.kv_rank} must be even for svd='split' (half for K, half for V); "
                f"use kv_rank={self.kv_rank + 1} or svd='joint'"
            )
        if self.rope_strategy == "rotated" and self.layout != "shared":
            raise ValueError(
                "rope_strategy='rotated' shares one RoPE key across heads, which needs the shared latent; "
                "use layout='shared' (or another rope_strategy with layout='per_head')"
            )
        if self.rope_window is not None and (self.rope_strategy != "rotated" or self.rope_window < 2):
            raise ValueError(
                f"rope_window={self.rope_window} applies to rope_strategy='rotated' only and must be >= 2 tokens; "
                "leave it None otherwise"
            )
        if self.calib_seq_len < 2:
            raise ValueError(f"calib_seq_len={self.calib_seq_len} must be >= 2 tokens")

    def check_against(self, head_dim: int, model_type: str, num_kv_heads: int = 1) -> None:
        """Raise before any heavy work if this config cannot apply to heads of `head_dim` dims."""
        if self.rope_dims > head_dim:
            raise ValueError(
                f"rope_dims={self.rope_dims} > head_dim={head_dim} for model_type={model_type}; use <= {head_dim}"
            )
        if self.rope_strategy == "rotated" and self.rope_window is None and self.rope_dims * num_kv_heads > head_dim:
            raise ValueError(
                f"rope_strategy='rotated' keeps the rope_dims * Hkv / 2 = {self.rope_dims * num_kv_heads // 2} fastest "
                f"frequencies, but a head has {head_dim // 2}; use rope_dims <= {head_dim // num_kv_heads // 2 * 2} "
                "(or a rope_window, whose slots may repeat a frequency)"
            )
        if self.kv_rank is None:
            return
        # non-RoPE key rows + value rows of one KV head; a rotated RoPE key leaves every key row a residual to factor
        rows = 2 * head_dim - (0 if self.rope_strategy == "rotated" else self.rope_dims)
        if self.kv_rank > rows:
            raise ValueError(
                f"kv_rank={self.kv_rank} > rows it factors per KV head ({rows}: non-RoPE key rows + value rows) "
                f"for model_type={model_type}; use kv_rank <= {rows}"
            )
        if self.svd == "split" and self.kv_rank // 2 > rows - head_dim:
            raise ValueError(
                f"kv_rank={self.kv_rank}: svd='split' gives K a rank of {self.kv_rank // 2} > its "
                f"{rows - head_dim} non-RoPE rows; use kv_rank <= {2 * (rows - head_dim)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)
