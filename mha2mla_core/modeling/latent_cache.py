"""The latent KV caches of the MLA model: what a converted attention layer caches, and nothing else.

Legend: B batch, T cached tokens, Hc latent groups, Rc latent dims per group, Hkv RoPE-key groups (Hp: one per KV
head, or one RoPE key shared by all heads), Dr kept RoPE dims, G = group_size tokens, R = residual_length tokens,
Tq quantized tokens.

Every cache keeps, per layer, the latent c_kv (B, Hc, T, Rc) as HF's "keys" and the RoPE'd kept key dims k_pe
(B, Hp, T, Dr) as its "values":
- `LatentCache`: grows with each step (transformers' DynamicCache);
- `StaticLatentCache`: preallocated for `max_cache_len` tokens and written in place (CUDA graphs);
- `QuantizedLatentCache`: old tokens as int4/int2 codes, the most recent in full precision.

The attention talks to every cache through two calls, as HF attention talks to its caches through `update`:
`update(c_kv, k_pe, layer_idx)` stores a step's latents and returns the layer's whole cache in full precision, and
`decode(c_kv, k_pe, layer_idx, query)` runs one absorbed decode step (S == 1) in the cache's fused kernel (Triton on
CUDA) where it has one for that step: the dynamic cache on CUDA without a mask, the static cache always (the mask gives
the left padding, the layer's length the written slots), the quantized cache without a mask (int4 codes are read as
stored). Where it has none, `decode` stores nothing and returns None, and the attention uses `update`.

Quantization: both cached tensors, c_kv (B, Hc, T, Rc) and k_pe (B, Hkv, T, Dr), are quantized per channel over
groups of G consecutive tokens (KIVI's key layout): the channels of an SVD latent differ in scale by orders of
magnitude (they follow the singular values), the tokens of one channel do not. A token is quantized once, when it leaves the residual
window, and never again: at least R most recent tokens stay in full precision and flushes move G tokens at a time
(transformers' `QuantizedLayer` instead re-quantizes the whole cache each time its residual fills, which compounds the
error and costs O(T) per flush). The codes use `GroupQuant`'s layout, which the int4 decode kernel reads directly.

Backends pick each group's scale and zero: `quanto` takes optimum-quanto's `MaxOptimizer` (min-max), `hqq` refines
min-max with HQQ's half-quadratic proximal solver (`hqq.core.optimize.optimize_weights_proximal`). quanto is the
default: on the converted SmolLM2-135M (2-norm r=8, kv_rank 16/head, shared, no fine-tuning; wikitext, 1k-token
context, decoded in chunks of 64, residual 128, group 64) the unquantized latent gives PPL 1070, int4 quanto 1065 vs
hqq 1106, int2 quanto 1097 vs hqq 1138. HQQ minimises an l_0.7 norm of the reconstruction error, which lowered the
attention error on synthetic Gaussian latents but not the model's loss on real ones, and its 20-step solver (which
also empties the CUDA cache) makes each flush far slower than one min/max.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from mha2mla_core.kernels import latent_decode_attention, latent_decode_attention_quantized
from mha2mla_core.kernels.quant_codes import GroupQuant, QuantizedLatentKV, pack_codes

SCALE_DTYPE = torch.float16  # quantized scales and zeros, whatever the cache dtype: 2 bytes per channel and group
BACKENDS = ("quanto", "hqq")


@dataclass(frozen=True)
class LatentQuery:
    """One absorbed decode step's query, as the decode kernels take it (H query heads, S == 1)."""

    q_lat: torch.Tensor  # (B, H, Rc): q_nope @ W_uk, in latent space
    q_pe: torch.Tensor  # (B, H, Dr): the RoPE'd query dims
    scale: float  # the score scale
    attention_mask: torch.Tensor | None  # HF's (B, 1, 1, T) mask of the step, or None


def left_padding(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) int32 index of each row's first attended key, from a decode step's (B, 1, 1, T) bool or additive mask;
    None without a mask. Computed on the device: no host sync."""
    if mask is None:
        return None
    allowed = mask[:, 0, -1] if mask.dtype == torch.bool else mask[:, 0, -1] == 0  # (B, T)
    return allowed.to(torch.int32).argmax(dim=-1).to(torch.int32)


class LatentCache(DynamicCache):
    """A DynamicCache whose per-layer "keys" are the latent c_kv (B, Hc, T, Rc) and "values" the RoPE'd
    kept key dims k_pe (B, Hp, T, Dr): nothing else is cached."""

    def decode(self, c_kv: torch.Tensor, k_pe: torch.Tensor, layer_idx: int, query: LatentQuery) -> torch.Tensor | None:
        """Store a decode step's latents (B, Hc, 1, Rc) / (B, Hp, 1, Dr) and attend over the layer: o_lat (B, H, Rc).
        The fused Triton kernel on CUDA without a mask; otherwise None, and nothing is stored."""
        if not (query.q_lat.is_cuda and query.attention_mask is None):
            return None
        c_kv, k_pe = self.update(c_kv, k_pe, layer_idx)  # (B, Hc, T, Rc), (B, Hp, T, Dr)
        return latent_decode_attention(query.q_lat, query.q_pe, c_kv, k_pe, query.scale)

    def latents(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        return layer.keys, layer.values

    def kv_bytes_per_token(self) -> float:
        """Bytes per cached token per sequence, measured from the cache's own tensors (all layers)."""
        layers = [layer for layer in self.layers if layer.get_seq_length() > 0]
        if not layers:
            raise ValueError("the cache is empty: run a forward pass with use_cache=True first")
        total = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
        batch, tokens = layers[0].keys.shape[0], layers[0].get_seq_length()
        return total / (batch * tokens)


class StaticLatentLayer(StaticLayer):
    """A StaticLayer whose keys (the latent c_kv, Hc groups) and values (k_pe, Hp keys) differ in head count."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.keys = key_states.new_zeros(key_states.shape[:2] + (self.max_cache_len, key_states.shape[3]))
        self.values = value_states.new_zeros(value_states.shape[:2] + (self.max_cache_len, value_states.shape[3]))
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True


class StaticLatentCache(LatentCache):
    """The latent cache preallocated for `max_cache_len` tokens and written in place, so that the tensors a decode
    step reads and writes keep their addresses (CUDA graphs). Same contents and byte count per token as LatentCache;
    what is allocated beyond the written tokens is not counted."""

    def __init__(self, num_layers: int, max_cache_len: int):
        Cache.__init__(self, layers=[StaticLatentLayer(max_cache_len) for _ in range(num_layers)])

    def decode(self, c_kv: torch.Tensor, k_pe: torch.Tensor, layer_idx: int, query: LatentQuery) -> torch.Tensor:
        """Every decode step runs in the decode kernel: the slots not yet written are cut by the layer's length
        (kv_end, a device tensor, so that a CUDA graph replays the step at every length), left padding by the mask."""
        c_kv, k_pe = self.update(c_kv, k_pe, layer_idx)  # (B, Hc, max_cache_len, Rc), (B, Hp, max_cache_len, Dr)
        kv_start, kv_end = left_padding(query.attention_mask), self.layers[layer_idx].cumulative_length
        return latent_decode_attention(query.q_lat, query.q_pe, c_kv, k_pe, query.scale, kv_start, kv_end)

    def kv_bytes_per_token(self) -> float:
        layer = self.layers[0]
        if not layer.is_initialized or int(layer.cumulative_length) == 0:
            raise ValueError("the cache is empty: run a forward pass with use_cache=True first")
        slots = sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values))
        return slots / (layer.batch_size * layer.max_cache_len)


@dataclass(frozen=True)
class KVCacheQuantConfig:
    """How the latent cache is quantized; stored as a dict in the model config's `kv_cache_quant`."""

    nbits: int = 4  # 4 or 2 bits per cached value
    group_size: int = 64  # tokens sharing one scale/zero per channel; a multiple of 16 (the int4 kernel's tile)
    residual_length: int = 128  # at least this many most recent tokens stay in full precision
    backend: str = "quanto"  # "quanto" (min-max) or "hqq" (proximal zero-point refinement)

    def __post_init__(self):
        if self.nbits not in (2, 4):
            raise ValueError(f"kv_cache_quant nbits={self.nbits} is not supported; use 4 or 2")
        if self.group_size <= 0 or self.group_size % 16:
            raise ValueError(f"kv_cache_quant group_size={self.group_size} must be a positive multiple of 16, e.g. 64")
        if self.residual_length < 0:
            raise ValueError(f"kv_cache_quant residual_length={self.residual_length} must be >= 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"kv_cache_quant backend={self.backend!r} is unknown; use one of {BACKENDS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KVCacheQuantConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"kv_cache_quant has unknown keys {sorted(unknown)}; known: {list(cls.__dataclass_fields__)}")
        return cls(**d)


def _hqq_params(rows: torch.Tensor, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G) fp32 rows -> inverse scale and zero (N, 1): min-max start as in HQQ's Quantizer, then its solver."""
    from hqq.core.optimize import optimize_weights_proximal

    max_code = 2**nbits - 1
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)  # (N, 1)
    inv_scale = torch.where(hi - lo <= 1e-4, 1.0, max_code / (hi - lo)).clamp(max=2e4)
    zero = -lo * inv_scale
    _, inv_scale, zero = optimize_weights_proximal(rows, inv_scale, zero, min_max=[0, max_code], axis=1)
    return inv_scale.float(), zero.float()


def _quanto_params(rows: torch.Tensor, nbits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G) fp32 rows -> inverse scale and zero (N, 1) from quanto's min-max: x ~= code * scale - shift."""
    from optimum.quanto import MaxOptimizer, qint2, qint4

    scale, shift = MaxOptimizer()(rows, qint4 if nbits == 4 else qint2, axis=0)  # (N, 1) each
    inv_scale = 1.0 / scale.clamp(min=1e-8)
    return inv_scale, shift * inv_scale


def quantize_groups(x: torch.Tensor, config: KVCacheQuantConfig) -> GroupQuant:
    """(B, Hx, Tq, D) with Tq a multiple of group_size -> per-channel, per-token-group codes."""
    B, Hx, Tq, D = x.shape
    G = config.group_size
    rows = x.float().unflatten(2, (Tq // G, G)).transpose(-1, -2).reshape(-1, G)  # (B*Hx*Tq/G*D, G): channel rows
    params = _hqq_params if config.backend == "hqq" else _quanto_params
    inv_scale, zero = params(rows, config.nbits)  # (N, 1) each
    codes = (rows * inv_scale + zero).round_().clamp_(0, 2**config.nbits - 1)  # (N, G)
    codes = codes.view(B, Hx, Tq // G, D, G).transpose(-1, -2).reshape(B, Hx, Tq, D)  # (B, Hx, Tq, D)
    scale = (1.0 / inv_scale).view(B, Hx, Tq // G, D).to(SCALE_DTYPE)  # (B, Hx, Tq/G, D)
    zero = zero.view(B, Hx, Tq // G, D).to(SCALE_DTYPE)
    return GroupQuant(pack_codes(codes.to(torch.uint8), config.nbits), scale, zero, config.nbits, G)


def _empty_codes(like: torch.Tensor, config: KVCacheQuantConfig) -> GroupQuant:
    B, Hx, _, D = like.shape
    codes = like.new_empty(B, Hx, 0, D * config.nbits // 8, dtype=torch.uint8)
    scale = like.new_empty(B, Hx, 0, D, dtype=SCALE_DTYPE)
    return GroupQuant(codes, scale, scale.clone(), config.nbits, config.group_size)


def _concat(a: GroupQuant, b: GroupQuant) -> GroupQuant:
    cat = functools.partial(torch.cat, dim=2)
    return GroupQuant(cat([a.codes, b.codes]), cat([a.scale, b.scale]), cat([a.zero, b.zero]), a.nbits, a.group_size)


def _map_batch(q: GroupQuant, fn) -> GroupQuant:
    return GroupQuant(fn(q.codes), fn(q.scale), fn(q.zero), q.nbits, q.group_size)


class QuantizedLatentLayer(DynamicLayer):
    """One layer of `QuantizedLatentCache`. `keys` / `values` hold the full-precision residual window of c_kv / k_pe
    (B, Hc, T - Tq, Rc) / (B, Hkv, T - Tq, Dr); `c_kv_codes` / `k_pe_codes` hold tokens [0, Tq)."""

    is_croppable = False

    def __init__(self, config: KVCacheQuantConfig):
        super().__init__()
        self.config = config
        self.c_kv_codes: GroupQuant | None = None
        self.k_pe_codes: GroupQuant | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        per_byte = 8 // self.config.nbits
        if key_states.shape[-1] % per_byte or value_states.shape[-1] % per_byte:
            raise ValueError(
                f"{self.config.nbits}-bit codes pack {per_byte} channels per byte, but the latent has "
                f"{key_states.shape[-1]} and the rope key {value_states.shape[-1]} channels; use nbits=4 or widths "
                f"divisible by {per_byte}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]  # (B, Hc, 0, Rc), (B, Hkv, 0, Dr)
        self.c_kv_codes = _empty_codes(key_states, self.config)
        self.k_pe_codes = _empty_codes(value_states, self.config)
        self.is_initialized = True

    def append(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store new tokens (B, Hc, S, Rc) / (B, Hkv, S, Dr); quantize whole groups that left the residual window."""
        if not self.is_initialized:
            self.lazy_initialization(c_kv, k_pe)
        self.keys = torch.cat([self.keys, c_kv], dim=-2)  # (B, Hc, T - Tq, Rc)
        self.values = torch.cat([self.values, k_pe], dim=-2)  # (B, Hkv, T - Tq, Dr)
        n = max(0, self.keys.shape[-2] - self.config.residual_length) // self.config.group_size * self.config.group_size
        if n == 0:
            return
        self.c_kv_codes = _concat(self.c_kv_codes, quantize_groups(self.keys[:, :, :n], self.config))
        self.k_pe_codes = _concat(self.k_pe_codes, quantize_groups(self.values[:, :, :n], self.config))
        self.keys, self.values = self.keys[:, :, n:].clone(), self.values[:, :, n:].clone()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """HF's contract: store, then return all cached c_kv / k_pe, the quantized part dequantized."""
        self.append(key_states, value_states)
        return self.state().dequantize()

    def state(self) -> QuantizedLatentKV:
        return QuantizedLatentKV(self.c_kv_codes, self.k_pe_codes, self.keys, self.values)

    @property
    def nbytes(self) -> int:
        return self.state().nbytes if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.c_kv_codes.num_tokens + self.keys.shape[-2] if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = self.c_kv_codes = self.k_pe_codes = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.c_kv_codes, self.k_pe_codes = _map_batch(self.c_kv_codes, fn), _map_batch(self.k_pe_codes, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])


class QuantizedLatentCache(LatentCache):
    """`LatentCache` whose layers keep old tokens as int4/int2 codes and the last residual_length in full precision.

    `update` returns dequantized latents (any attention path works); `decode` appends and then runs
    `latent_decode_attention_quantized` on the layer's codes, which never materialises the dequantized cache.
    """

    def __init__(self, config: KVCacheQuantConfig):
        Cache.__init__(self, layer_class_to_replicate=functools.partial(QuantizedLatentLayer, config))
        self.quant_config = config

    @classmethod
    def from_model_config(cls, model_config) -> "QuantizedLatentCache":
        """From a model config whose `kv_cache_quant` holds a `KVCacheQuantConfig.to_dict()`."""
        return cls(KVCacheQuantConfig.from_dict(model_config.kv_cache_quant))

    def append(self, c_kv: torch.Tensor, k_pe: torch.Tensor, layer_idx: int) -> None:
        while len(self.layers) <= layer_idx:
            self.layers.append(self.layer_class_to_replicate())
        self.layers[layer_idx].append(c_kv, k_pe)

    def decode(self, c_kv: torch.Tensor, k_pe: torch.Tensor, layer_idx: int, query: LatentQuery) -> torch.Tensor | None:
        """A decode step without a mask reads the codes as stored (int4: dequantized inside the fused kernel on CUDA);
        with a mask: None, and nothing is stored."""
        if query.attention_mask is not None:
            return None
        self.append(c_kv, k_pe, layer_idx)
        return latent_decode_attention_quantized(query.q_lat, query.q_pe, self.quantized_state(layer_idx), query.scale)

    def quantized_state(self, layer_idx: int) -> QuantizedLatentKV:
        return self.layers[layer_idx].state()

    def latents(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].state().dequantize()

    def kv_bytes_per_token(self) -> float:
        """Bytes per cached token per sequence over all layers, from the codes, scales, zeros and residual tensors."""
        layers = [layer for layer in self.layers if layer.get_seq_length() > 0]
        if not layers:
            raise ValueError("the cache is empty: run a forward pass with use_cache=True first")
        batch, tokens = layers[0].keys.shape[0], layers[0].get_seq_length()
        return sum(layer.nbytes for layer in layers) / (batch * tokens)
