"""The MLA model: Llama decoder layers whose attention caches only a latent plus a few RoPE'd key dims.

Legend: B batch, S query tokens, T key tokens, H query heads, Hkv key/value heads, n_rep = H / Hkv,
D head dim, Dr kept RoPE dims per RoPE key, Hp RoPE keys (Hkv, or 1 for a shared rotated key), Dn non-RoPE key dims
per head (D - Dr, or D with a shared key), Hc latent groups (`kv_latent_groups`), Rc latent dims per group
(`kv_lora_rank`), P = Dr / 2 pairs.

Per token and layer the cache holds c_kv (Hc * Rc values) and k_pe (Hp * Dr values):
    c_kv = kv_a_proj(x)                      the latent
    k_pe = RoPE(k_rope_proj(x))              the kept RoPE key dims: per KV head, or one key shared by all heads
    [k_nope | v] = kv_b_proj(c_kv)           expanded per KV head (prefill, training)
A query head scores q_pe . k_pe + q_nope . k_nope, with q_pe from its own q_proj rows.
Decode works in latent space (absorbed): W_uk is folded into the query and W_uv applied after the
attention-weighted sum of latents, so the cache is never expanded. The attention hands a decode step to its cache
(`LatentCache.decode`, `mha2mla_core.modeling.latent_cache`), which runs it in the fused kernel it has for that step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from mha2mla_core.modeling.latent_cache import LatentCache, LatentQuery, QuantizedLatentCache, StaticLatentCache

logger = logging.getLogger(__name__)

MLA_MODEL_TYPE = "mla_llama"


class MLALlamaConfig(LlamaConfig):
    """A Llama config plus the MLA fields needed to rebuild the converted attention.

    The latent's width is DeepSeek's `kv_lora_rank` (Rc, per latent group) times `kv_latent_groups` (Hc); the
    conversion's `MLAConfig.kv_rank` (R, per KV head) sets it: Rc = R * Hkv / Hc. These serialized names are what
    checkpoints and the DeepSeek-V3 export read; the code uses the same names for the same quantities.

    `rope_pairs[layer][rope_key]` lists the frequency-pair index of each kept pair (pair i = dims i and i + D/2);
    `shared_rope` makes that ONE RoPE key of `qk_rope_head_dim` dims read by every query head (rotated partial RoPE,
    DeepSeek's k_pe), whose pairs may repeat a frequency, and keeps all D query/key dims of each head besides it.
    """

    model_type = MLA_MODEL_TYPE

    def __init__(
        self,
        qk_rope_head_dim: int = 8,
        kv_lora_rank: int = 48,
        kv_latent_groups: int = 1,
        rope_pairs: list | None = None,
        q_bias: bool = False,
        kv_bias: bool = False,
        o_bias: bool = False,
        mla_decode: str = "absorbed",
        source_model_type: str = "llama",
        mla_conversion: dict | None = None,
        kv_cache_quant: dict | None = None,
        shared_rope: bool = False,
        **kwargs,
    ):
        self.qk_rope_head_dim = qk_rope_head_dim
        self.kv_lora_rank = kv_lora_rank  # Rc: latent dims per latent group
        self.kv_latent_groups = kv_latent_groups  # Hc
        self.rope_pairs = rope_pairs
        self.q_bias = q_bias
        self.kv_bias = kv_bias
        self.o_bias = o_bias
        self.mla_decode = mla_decode
        self.source_model_type = source_model_type
        self.mla_conversion = mla_conversion or {}
        self.kv_cache_quant = kv_cache_quant
        self.shared_rope = shared_rope
        super().__init__(**kwargs)
        self.validate_mla()

    def validate_mla(self) -> None:
        d = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.rope_pairs is None:
            # a fresh config (tests, from scratch): keep the highest-frequency pairs everywhere
            pairs = [i % (d // 2) for i in range(self.qk_rope_head_dim // 2)]
            self.rope_pairs = [[pairs] * self.rope_heads for _ in range(self.num_hidden_layers)]
        shape = (len(self.rope_pairs), len(self.rope_pairs[0]), len(self.rope_pairs[0][0]))
        want = (self.num_hidden_layers, self.rope_heads, self.qk_rope_head_dim // 2)
        if shape != want:
            raise ValueError(f"rope_pairs has shape {shape}, expected (layers, rope keys, rope_dims/2) = {want}")
        if self.shared_rope and self.kv_latent_groups != 1:
            raise ValueError(f"shared_rope needs one latent group (kv_latent_groups=1), got {self.kv_latent_groups}")
        if self.num_key_value_heads % self.kv_latent_groups:
            raise ValueError(
                f"kv_latent_groups={self.kv_latent_groups} must divide num_key_value_heads={self.num_key_value_heads}"
            )
        if self.mla_decode not in ("absorbed", "expanded"):
            raise ValueError(f"mla_decode={self.mla_decode!r}; use 'absorbed' or 'expanded'")
        widest = d * (self.num_key_value_heads if self.shared_rope else 1)
        if not 0 < self.qk_rope_head_dim <= widest:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be in (0, {widest}]")

    @property
    def rope_heads(self) -> int:
        """Hp: RoPE keys per token and layer (one per KV head, or one shared by all heads)."""
        return 1 if self.shared_rope else self.num_key_value_heads

    @property
    def qk_nope_head_dim(self) -> int:
        return self.head_dim if self.shared_rope else self.head_dim - self.qk_rope_head_dim


class GroupedLinear(nn.Module):
    """`groups` independent linear maps: (..., G, in) -> (..., G, out). G=1 is a plain linear."""

    def __init__(self, groups: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("...gi,goi->...go", x, self.weight)
        return y if self.bias is None else y + self.bias


def rope_pair_cos_sin(
    cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the kept frequency pairs of each RoPE key from Llama's (B, T, D) cos/sin.

    pairs: (Hp, P) long. Returns cos, sin of shape (B, Hp, T, 2P) in rotate-half order.
    """
    c = cos[..., pairs].permute(0, 2, 1, 3)  # (B, Hp, T, P)
    s = sin[..., pairs].permute(0, 2, 1, 3)  # (B, Hp, T, P)
    return torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)  # (B, Hp, T, Dr)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., Dr) laid out as [first halves of the kept pairs | second halves]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass(frozen=True)
class FusedDecodeWeights:
    """One layer's decode step in two matmuls (`MLAAttention.fused_decode_weights`).

    w_in (H*Rc + H*Dr + Hc*Rc + Hp*Dr, E): [q_lat | q_pe | c_kv | k_pe] from the hidden state in one matmul, W_uk
    folded into the query's non-RoPE rows; w_out (E, H*Rc): o_proj with W_uv folded in. Biases as the layer's.
    """

    w_in: torch.Tensor
    b_in: torch.Tensor | None
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    splits: tuple[int, int, int, int]  # widths of q_lat, q_pe, c_kv, k_pe in w_in's rows


class MLAAttention(nn.Module):
    """Multi-head latent attention converted from a Llama-family attention layer.

    Query heads keep their own projection, laid out per head as [rope dims | nope dims]. Keys and values
    come from a latent c_kv (cached) and a small set of RoPE'd key dims k_pe (cached), per KV head or shared.
    """

    def __init__(self, config: MLALlamaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # n_rep, read by attention kernels
        self.head_dim = config.head_dim
        self.rope_heads = config.rope_heads
        self.rope_dim = config.qk_rope_head_dim
        self.nope_dim = config.qk_nope_head_dim
        self.kv_latent_groups = config.kv_latent_groups  # Hc
        self.kv_lora_rank = config.kv_lora_rank  # Rc, per latent group (MLAConfig.kv_rank is per KV head)
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        hidden, kv_per_group = config.hidden_size, self.num_kv_heads // self.kv_latent_groups
        self.q_proj = nn.Linear(hidden, self.num_heads * (self.rope_dim + self.nope_dim), bias=config.q_bias)
        self.kv_a_proj = nn.Linear(hidden, self.kv_latent_groups * self.kv_lora_rank, bias=False)
        self.k_rope_proj = nn.Linear(hidden, self.rope_heads * self.rope_dim, bias=config.kv_bias)
        self.kv_b_proj = GroupedLinear(
            self.kv_latent_groups, self.kv_lora_rank, kv_per_group * (self.nope_dim + self.head_dim), config.kv_bias
        )
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        pairs = torch.tensor(config.rope_pairs[layer_idx], dtype=torch.long)  # (Hp, P)
        self.register_buffer("rope_pairs", pairs)

    # ---- projections -------------------------------------------------------------------------------
    def project_latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, hidden) -> c_kv (B, Hc, T, Rc), k_pe (B, Hp, T, Dr): exactly what the cache stores."""
        b, t, _ = x.shape
        c_kv = self.kv_a_proj(x).view(b, t, self.kv_latent_groups, self.kv_lora_rank).transpose(1, 2)  # (B, Hc, T, Rc)
        k_pe = self.k_rope_proj(x).view(b, t, self.rope_heads, self.rope_dim).transpose(1, 2)  # (B, Hp, T, Dr)
        return c_kv, apply_partial_rope(k_pe, cos, sin)

    def project_query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, S, hidden) -> q_pe (B, Hkv, n_rep, S, Dr) RoPE'd, q_nope (B, Hkv, n_rep, S, Dn)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_kv_heads, self.num_key_value_groups, self.rope_dim + self.nope_dim)
        q = q.permute(0, 2, 3, 1, 4)  # (B, Hkv, n_rep, S, Dr + Dn)
        q_pe, q_nope = q.split([self.rope_dim, self.nope_dim], dim=-1)
        q_pe = apply_partial_rope(q_pe, cos.unsqueeze(2), sin.unsqueeze(2))  # (B, Hkv, n_rep, S, Dr)
        return q_pe, q_nope

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """W_uk (Hkv, Dn, Rc), W_uv (Hkv, D, Rc) and the value bias (Hkv, D) or None, from kv_b_proj."""
        w = self.kv_b_proj.weight.view(self.num_kv_heads, self.nope_dim + self.head_dim, self.kv_lora_rank)
        b_v = None
        if self.kv_b_proj.bias is not None:
            b_v = self.kv_b_proj.bias.view(self.num_kv_heads, -1)[:, self.nope_dim :]  # (Hkv, D)
        return w[:, : self.nope_dim], w[:, self.nope_dim :], b_v

    @torch.no_grad()
    def fused_decode_weights(self) -> FusedDecodeWeights:
        """This layer's decode step folded into two matmuls (computed in fp32, stored in the weights' dtype): fewer,
        larger kernels for a step that launches many small ones. A snapshot: rebuild it after the weights change."""
        g, r, dr, dn, rc, e = (self.num_kv_heads, self.num_key_value_groups, self.rope_dim, self.nope_dim,
                               self.kv_lora_rank, self.config.hidden_size)  # fmt: skip
        w_uk, w_uv, b_v = (None if w is None else w.float() for w in self.up_weights())  # (G, Dn, Rc), (G, D, Rc)
        w_q = self.q_proj.weight.float().view(g, r, dr + dn, e)
        w_in = torch.cat([
            torch.einsum("gdc,grdi->grci", w_uk, w_q[:, :, dr:]).reshape(-1, e),  # q_lat = W_uk^T q_nope
            w_q[:, :, :dr].reshape(-1, e), self.kv_a_proj.weight.float(), self.k_rope_proj.weight.float(),
        ])  # fmt: skip
        b_in = None
        if self.q_proj.bias is not None or self.k_rope_proj.bias is not None:
            zeros = w_q.new_zeros
            b_q = zeros(g, r, dr + dn) if self.q_proj.bias is None else self.q_proj.bias.float().view(g, r, dr + dn)
            b_k = zeros(self.k_rope_proj.out_features) if self.k_rope_proj.bias is None else self.k_rope_proj.bias
            b_in = torch.cat([torch.einsum("gdc,grd->grc", w_uk, b_q[:, :, dr:]).flatten(), b_q[:, :, :dr].flatten(),
                              zeros(self.kv_a_proj.out_features), b_k.float()])  # fmt: skip
        w_o = self.o_proj.weight.float().view(e, g, r, self.head_dim)
        w_out = torch.einsum("igrd,gdc->igrc", w_o, w_uv).reshape(e, -1)  # o_proj(W_uv o_lat)
        b_out = None if self.o_proj.bias is None else self.o_proj.bias.float()
        if b_v is not None:  # the value bias passes through o_proj
            b_out = torch.einsum("igrd,gd->i", w_o, b_v) + (0 if b_out is None else b_out)
        dtype = self.q_proj.weight.dtype
        cast = lambda t: None if t is None else t.to(dtype).contiguous()  # noqa: E731
        splits = (g * r * rc, g * r * dr, self.kv_latent_groups * rc, self.rope_heads * dr)
        return FusedDecodeWeights(cast(w_in), cast(b_in), cast(w_out), cast(b_out), splits)

    def fused_decode_step(self, x, cos, sin, attention_mask, cache: LatentCache, w: FusedDecodeWeights):
        """A decode step (S == 1) through `fused_decode_weights`: the same attention as `absorbed_attention` and
        o_proj, in two matmuls around the cache's kernel. x (B, 1, E) -> (B, 1, E)."""
        b = x.shape[0]
        g, r, dr = self.num_kv_heads, self.num_key_value_groups, self.rope_dim
        q_lat, q_pe, c_kv, k_pe = F.linear(x, w.w_in, w.b_in).split(w.splits, dim=-1)  # (B, 1, width) each
        q_pe = apply_partial_rope(q_pe.view(b, g, r, 1, dr), cos.unsqueeze(2), sin.unsqueeze(2))  # (B, G, r, 1, Dr)
        k_pe = apply_partial_rope(k_pe.view(b, 1, self.rope_heads, dr).transpose(1, 2), cos, sin)  # (B, Hp, 1, Dr)
        c_kv = c_kv.view(b, 1, self.kv_latent_groups, self.kv_lora_rank).transpose(1, 2)  # (B, Hc, 1, Rc)
        heads = q_lat.reshape(b, self.num_heads, self.kv_lora_rank), q_pe.reshape(b, self.num_heads, dr)
        o_lat = cache.decode(c_kv, k_pe, self.layer_idx, LatentQuery(*heads, self.scaling, attention_mask))
        if o_lat is None:  # a cache with no kernel for this step: attend in PyTorch on what it stores
            q_lat5 = heads[0].view(b, g, r, 1, self.kv_lora_rank)
            o_lat = self.latent_attention(q_lat5, q_pe, *cache.update(c_kv, k_pe, self.layer_idx), attention_mask)
        return F.linear(o_lat.reshape(b, 1, -1), w.w_out, w.b_out)

    # ---- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: LatentCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """`mla_decode_weights` (a list of every layer's `fused_decode_weights`, as the static decoder passes it)
        runs a decode step through them."""
        cos, sin = rope_pair_cos_sin(*position_embeddings, self.rope_pairs)  # (B, Hp, S, Dr)
        fused = kwargs.get("mla_decode_weights")
        if fused is not None and hidden_states.shape[1] == 1 and past_key_values is not None:
            step = fused[self.layer_idx]
            return self.fused_decode_step(hidden_states, cos, sin, attention_mask, past_key_values, step), None
        c_kv, k_pe = self.project_latent(hidden_states, cos, sin)
        q_pe, q_nope = self.project_query(hidden_states, cos, sin)
        b, s = hidden_states.shape[:2]
        # a decode step (S == 1) never reads the cache length on the host, so it can be captured in a CUDA graph
        prefill = past_key_values is None or (s > 1 and int(past_key_values.get_seq_length(self.layer_idx)) == 0)
        if not prefill and self.config.mla_decode == "absorbed":
            out = self.absorbed_attention(q_pe, q_nope, c_kv, k_pe, attention_mask, past_key_values)
            return self.o_proj(out.reshape(b, s, -1)), None
        if past_key_values is not None:
            cached = past_key_values.update(c_kv, k_pe, self.layer_idx)
            if not prefill:  # a prefill from an empty cache attends to its own tokens, not a static cache's slots
                c_kv, k_pe = cached
        out = self.expanded_attention(q_pe, q_nope, c_kv, k_pe, attention_mask, **kwargs)
        return self.o_proj(out.reshape(b, s, -1)), None

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents -> full keys and values (B, Hkv, T, D), keys laid out [rope | nope] like the queries."""
        b, _, t, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.transpose(1, 2))  # (B, T, Hc, kv_per_group * (Dn + D))
        kv = kv.view(b, t, self.num_kv_heads, self.nope_dim + self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dn + D)
        k_nope, v = kv.split([self.nope_dim, self.head_dim], dim=-1)
        k_pe = k_pe.expand(-1, self.num_kv_heads, -1, -1)  # a shared RoPE key serves every KV head
        return torch.cat([k_pe, k_nope], dim=-1), v

    def expanded_attention(self, q_pe, q_nope, c_kv, k_pe, attention_mask, **kwargs) -> torch.Tensor:
        """Standard attention on expanded K/V (prefill and training); returns (B, S, H, D)."""
        b, _, _, s, _ = q_pe.shape
        q = torch.cat([q_pe, q_nope], dim=-1).reshape(b, self.num_heads, s, -1)  # (B, H, S, Dr + Dn)
        k, v = self.expand_kv(c_kv, k_pe)
        if attention_mask is not None and attention_mask.shape[-1] > k.shape[2]:  # a static cache's mask spans its slots
            attention_mask = attention_mask[..., : k.shape[2]]
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            self,
            q,
            k.to(q.dtype),
            v.to(q.dtype),
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        return out  # (B, S, H, D)

    def absorbed_attention(self, q_pe, q_nope, c_kv, k_pe, attention_mask, cache: LatentCache) -> torch.Tensor:
        """Attention computed in latent space against the cache as stored; returns (B, S, H, D).

        c_kv (B, Hc, S, Rc) and k_pe (B, Hp, S, Dr) are this step's latents. A decode step (S == 1) goes to the cache's
        `decode`, which stores them and attends in its fused kernel where it has one; otherwise the cache stores them
        (`update`) and the attention runs here, in PyTorch, on the latents it returns."""
        w_uk, w_uv, b_v = self.up_weights()
        b, g, r, s, _ = q_pe.shape
        q_lat = torch.einsum("bgrsd,gdc->bgrsc", q_nope, w_uk.to(q_nope.dtype))  # (B, Hkv, n_rep, S, Rc)
        o_lat = None
        if s == 1:  # the decode kernels' layout: (B, H, Rc) and (B, H, Dr)
            heads = q_lat.reshape(b, self.num_heads, self.kv_lora_rank), q_pe.reshape(b, self.num_heads, self.rope_dim)
            o_lat = cache.decode(c_kv, k_pe, self.layer_idx, LatentQuery(*heads, self.scaling, attention_mask))
        if o_lat is None:
            o_lat = self.latent_attention(q_lat, q_pe, *cache.update(c_kv, k_pe, self.layer_idx), attention_mask)
        else:
            o_lat = o_lat.view(b, g, r, 1, self.kv_lora_rank)  # (B, Hkv, n_rep, 1, Rc)
        out = torch.einsum("bgrsc,gdc->bgrsd", o_lat, w_uv.to(o_lat.dtype))  # (B, Hkv, n_rep, S, D)
        if b_v is not None:
            out = out + b_v[None, :, None, None, :].to(out.dtype)
        return out.reshape(b, self.num_heads, s, self.head_dim).transpose(1, 2)  # (B, S, H, D)

    def latent_attention(self, q_lat, q_pe, c_kv, k_pe, attention_mask):
        """softmax(scale * (q_lat.c_kv + q_pe.k_pe)) @ c_kv -> o_lat (B, Hkv, n_rep, S, Rc) (PyTorch path)."""
        b, g, r, s, _ = q_pe.shape
        heads_per_latent = self.num_heads // self.kv_latent_groups
        t = c_kv.shape[2]
        q_lat = q_lat.reshape(b, self.kv_latent_groups, heads_per_latent, s, self.kv_lora_rank)  # (B, Hc, H/Hc, S, Rc)
        scores = torch.einsum("bhqsc,bhtc->bhqst", q_lat, c_kv.to(q_lat.dtype))  # (B, Hc, H/Hc, S, T)
        q_pe = q_pe.reshape(b, self.rope_heads, self.num_heads // self.rope_heads, s, self.rope_dim)  # (B, Hp, H/Hp, S, Dr)
        s_pe = torch.einsum("bpqsd,bptd->bpqst", q_pe, k_pe.to(q_pe.dtype)).reshape(b, g, r, s, t)
        scores = scores.reshape(b, g, r, s, t) + s_pe
        scores = scores.float() * self.scaling  # (B, Hkv, n_rep, S, T)
        scores = scores + _additive_mask(attention_mask, s, t, scores.device)
        probs = scores.softmax(dim=-1).to(c_kv.dtype).view(b, self.kv_latent_groups, heads_per_latent, s, t)
        o_lat = torch.einsum("bhqst,bhtc->bhqsc", probs, c_kv)  # (B, Hc, H/Hc, S, Rc)
        return o_lat.reshape(b, g, r, s, self.kv_lora_rank).to(q_lat.dtype)


def _additive_mask(mask: torch.Tensor | None, s: int, t: int, device: torch.device) -> torch.Tensor:
    """A float mask broadcastable to (B, Hkv, n_rep, S, T) from HF's (B, 1, S, T) bool/float mask or None."""
    if mask is None:
        # causal over the last S of T positions
        q_pos = torch.arange(t - s, t, device=device)[:, None]
        allowed = torch.arange(t, device=device)[None, :] <= q_pos
        return torch.where(allowed, 0.0, -math.inf)[None, None, None]
    mask = mask[..., -s:, -t:]
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, -math.inf)
    return mask.float()[:, :, None]  # (B, 1, 1, S, T)


class MLAForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with every layer's attention replaced by MLAAttention and a LatentCache."""

    config_class = MLALlamaConfig

    def __init__(self, config: MLALlamaConfig):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = MLAAttention(config, i)
        self.post_init()

    def make_cache(self) -> LatentCache:
        if self.config.kv_cache_quant:
            return QuantizedLatentCache.from_model_config(self.config)
        return LatentCache()

    def make_static_cache(self, max_cache_len: int) -> StaticLatentCache:
        """A preallocated latent cache (CUDA-graph decoding). It holds the latent in the model's dtype: a model with a
        quantized cache (`kv_cache_quant`) keeps its codes only in the dynamic cache, which this logs."""
        if self.config.kv_cache_quant:
            logger.warning(
                "a static cache holds the latent in %s; this model's %s-bit cache (kv_cache_quant) applies to the "
                "dynamic cache only: decode without cache_implementation='static' / generate_static to keep it",
                self.dtype, self.config.kv_cache_quant["nbits"],
            )
        return StaticLatentCache(self.config.num_hidden_layers, max_cache_len)

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = self.make_cache()
        if past_key_values is not None and not isinstance(past_key_values, LatentCache):
            raise ValueError(
                f"past_key_values is a {type(past_key_values).__name__}; an MLA model caches latents: pass a LatentCache, "
                "StaticLatentCache or QuantizedLatentCache, or none (the model makes its own)"
            )
        return super().forward(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        implementation = generation_config.cache_implementation
        if model_kwargs.get("past_key_values") is None and implementation in (None, "dynamic", "static"):
            if implementation == "static":
                max_len = generation_config.max_length  # prompt + new tokens, resolved by generate()
                model_kwargs["past_key_values"] = self.make_static_cache(max_len)
            else:
                model_kwargs["past_key_values"] = self.make_cache()
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
        """generate() never torch.compiles this model on its own: the decode step calls a Triton kernel, and
        `mha2mla_core.modeling.decoding.generate_static` replays it from a CUDA graph instead (tested, measured)."""
        return False

    @torch.no_grad()
    def kv_bytes_per_token(self, probe_tokens: int = 8) -> float:
        """Measured cache bytes per token per sequence: runs a short forward and reads the cache's tensors."""
        ids = torch.zeros(1, probe_tokens, dtype=torch.long, device=self.device)
        cache = self.make_cache()
        self(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache.kv_bytes_per_token()


AutoConfig.register(MLA_MODEL_TYPE, MLALlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MLALlamaConfig, MLAForCausalLM, exist_ok=True)
