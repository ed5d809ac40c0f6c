"""One decode step of absorbed MLA attention over a latent KV cache.

Legend: B batch, T cached tokens, H query heads, Hkv RoPE-key groups (1 for a rope key shared by all heads), Hc latent
groups (Hc = Hkv for the per-head layout, 1 for the shared layout), Rc latent width of one group, Dr kept RoPE dims,
G = H // Hc heads per latent group. One of Hc, Hkv divides the other.

Head h scores token t as  scale * (q_lat[h] . c_kv[h // (H // Hc), t] + q_pe[h] . k_pe[h // (H // Hkv), t])  and
returns the softmax-weighted sum of its group's latents; W_uv is applied by the caller. On CUDA the step runs in the
Triton kernels of `mha2mla_core.kernels.triton_latent` (one program per latent group and sequence split reads each
latent tile once for all G heads); elsewhere it runs in `latent_decode_attention_reference`.

The quantized cache stores its old tokens as `GroupQuant` codes (the layout the int4 kernel reads) and the most recent
ones in full precision; `QuantizedLatentKV` is one layer's worth of that state.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GroupQuant:
    """Affine integer codes of a (B, Hx, Tq, D) tensor, one scale/zero per channel and group of tokens.

    Groups run along T (per-channel quantization, KIVI's key layout): channels of a latent differ in scale by orders
    of magnitude (they follow the singular values), tokens of one channel do not.

    codes: (B, Hx, Tq, D * nbits // 8) uint8; byte j holds channels j*k .. j*k+k-1 (k = 8 // nbits), channel j*k+i
           in bits [i*nbits, (i+1)*nbits): for int4, byte j = code(2j) | code(2j+1) << 4
    scale, zero: (B, Hx, Tq // group_size, D); x ~= (code - zero) * scale
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    nbits: int
    group_size: int

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


@dataclass(frozen=True)
class QuantizedLatentKV:
    """One layer's quantized latent cache: tokens [0, Tq) as codes, the most recent [Tq, T) in full precision."""

    c_kv: GroupQuant  # (B, Hc, Tq, Rc) codes
    k_pe: GroupQuant  # (B, Hkv, Tq, Dr) codes
    c_kv_residual: torch.Tensor  # (B, Hc, T - Tq, Rc)
    k_pe_residual: torch.Tensor  # (B, Hkv, T - Tq, Dr)

    @property
    def num_tokens(self) -> int:
        return self.c_kv.num_tokens + self.c_kv_residual.shape[2]

    @property
    def nbytes(self) -> int:
        residual = (self.c_kv_residual, self.k_pe_residual)
        return self.c_kv.nbytes + self.k_pe.nbytes + sum(t.numel() * t.element_size() for t in residual)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision (B, Hc, T, Rc) latents and (B, Hkv, T, Dr) rope keys, in the residual's dtype."""
        dtype = self.c_kv_residual.dtype
        c_kv = torch.cat([dequantize_group(self.c_kv).to(dtype), self.c_kv_residual], dim=2)  # (B, Hc, T, Rc)
        k_pe = torch.cat([dequantize_group(self.k_pe).to(dtype), self.k_pe_residual], dim=2)  # (B, Hkv, T, Dr)
        return c_kv, k_pe


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(..., D) integer codes in [0, 2**nbits) -> (..., D * nbits // 8) uint8, low bits first (see `GroupQuant`)."""
    per_byte = 8 // nbits
    shifts = torch.arange(0, 8, nbits, device=codes.device, dtype=torch.uint8)  # (k,)
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, per_byte))  # (..., D // k, k)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)  # (..., D // k); disjoint bits, so sum == or


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (..., D * nbits // 8) uint8 -> (..., D) uint8 codes."""
    shifts = torch.arange(0, 8, nbits, device=packed.device, dtype=torch.uint8)  # (k,)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**nbits - 1)  # (..., D // k, k)
    return codes.flatten(-2)  # (..., D)


def dequantize_group(q: GroupQuant) -> torch.Tensor:
    """(B, Hx, Tq, D) fp32 values."""
    codes = unpack_codes(q.codes, q.nbits).float()  # (B, Hx, Tq, D)
    scale = q.scale.float().repeat_interleave(q.group_size, dim=2)  # (B, Hx, Tq, D)
    zero = q.zero.float().repeat_interleave(q.group_size, dim=2)  # (B, Hx, Tq, D)
    return (codes - zero) * scale


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale: float, kv_start=None, kv_end=None) -> torch.Tensor:
    """One decode step of absorbed MLA attention.

    q_lat: (B, H, Rc)      query already multiplied by W_uk (latent space); head h reads latent group h // (H // Hc)
    q_pe:  (B, H, Dr)      RoPE'd query rope dims; head h reads rope-key group h // (H // Hkv)
    c_kv:  (B, Hc, T, Rc)  latent cache (Hc = Hkv for the per-head layout, 1 for the shared layout)
    k_pe:  (B, Hkv, T, Dr) RoPE'd kept key dims
    kv_start: optional (B,) int32: positions t < kv_start[b] are masked (left padding)
    kv_end:   optional one-element int tensor: positions t >= kv_end are masked (the unwritten tail of a static cache);
              a tensor, not an int, so that a CUDA graph replays the step at every length
    returns o_lat: (B, H, Rc) = softmax(scale * (q_lat.c_kv + q_pe.k_pe)) @ c_kv, fp32 accumulation, output in q's dtype
    """
    _check_decode_inputs(q_lat, q_pe, c_kv, k_pe, kv_start, kv_end)
    if c_kv.is_cuda and c_kv.dtype in _TRITON_DTYPES and triton_available():
        from mha2mla_core.kernels import triton_latent

        return triton_latent.decode(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)
    return latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)


def latent_decode_attention_quantized(q_lat, q_pe, kv: QuantizedLatentKV, scale: float, kv_start=None):
    """`latent_decode_attention` over a quantized layer; int4 codes are dequantized inside the kernel on CUDA."""
    c_res, k_res = kv.c_kv_residual, kv.k_pe_residual
    _check_decode_inputs(q_lat, q_pe, c_res, k_res, kv_start)
    fused = kv.c_kv.nbits == 4 and kv.k_pe.nbits == 4 and kv.c_kv.num_tokens > 0
    if fused and c_res.is_cuda and c_res.dtype in _TRITON_DTYPES and triton_available():
        from mha2mla_core.kernels import triton_latent

        return triton_latent.decode_int4(q_lat, q_pe, kv, scale, kv_start)
    c_kv, k_pe = kv.dequantize()  # (B, Hc, T, Rc), (B, Hkv, T, Dr)
    return latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale, kv_start)


def latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale: float, kv_start=None, kv_end=None):
    """Plain-torch `latent_decode_attention`: fp32 scores and softmax, output in q's dtype."""
    B, H, Rc = q_lat.shape
    Hc, T, Hkv, Dr = c_kv.shape[1], c_kv.shape[2], k_pe.shape[1], k_pe.shape[3]
    q_lat_g = q_lat.float().view(B, Hc, H // Hc, Rc)  # (B, Hc, G, Rc)
    q_pe_g = q_pe.float().view(B, Hkv, H // Hkv, Dr)  # (B, Hkv, H // Hkv, Dr)
    s_lat = torch.einsum("bcgr,bctr->bcgt", q_lat_g, c_kv.float()).reshape(B, H, T)  # (B, H, T)
    s_pe = torch.einsum("bkgd,bktd->bkgt", q_pe_g, k_pe.float()).reshape(B, H, T)  # (B, H, T)
    scores = (s_lat + s_pe) * scale  # (B, H, T)
    positions = torch.arange(T, device=c_kv.device)  # (T,)
    if kv_start is not None:
        masked = positions[None, :] < kv_start.to(c_kv.device)[:, None]  # (B, T)
        scores = scores.masked_fill(masked[:, None, :], float("-inf"))
    if kv_end is not None:
        scores = scores.masked_fill(positions >= kv_end.to(c_kv.device).reshape(()), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, Hc, H // Hc, T)  # (B, Hc, G, T)
    o_lat = torch.einsum("bcgt,bctr->bcgr", probs, c_kv.float())  # (B, Hc, G, Rc)
    return o_lat.reshape(B, H, Rc).to(q_lat.dtype)


def _check_decode_inputs(q_lat, q_pe, c_kv, k_pe, kv_start, kv_end=None) -> None:
    if q_lat.dim() != 3 or q_pe.dim() != 3 or c_kv.dim() != 4 or k_pe.dim() != 4:
        raise ValueError(
            f"expected q_lat (B, H, Rc), q_pe (B, H, Dr), c_kv (B, Hc, T, Rc), k_pe (B, Hkv, T, Dr); got "
            f"{tuple(q_lat.shape)}, {tuple(q_pe.shape)}, {tuple(c_kv.shape)}, {tuple(k_pe.shape)}"
        )
    (B, H, Rc), (Dr, Hc, Hkv) = q_lat.shape, (q_pe.shape[2], c_kv.shape[1], k_pe.shape[1])
    if q_pe.shape[:2] != (B, H) or c_kv.shape[::3] != (B, Rc) or k_pe.shape[::3] != (B, Dr):
        raise ValueError(
            f"shape mismatch: q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, c_kv {tuple(c_kv.shape)}, "
            f"k_pe {tuple(k_pe.shape)}; B, H, Rc and Dr must agree"
        )
    if c_kv.shape[2] != k_pe.shape[2]:
        raise ValueError(f"c_kv holds {c_kv.shape[2]} tokens but k_pe holds {k_pe.shape[2]}; they must match")
    if H % Hkv or H % Hc or (Hkv % Hc and Hc % Hkv):
        raise ValueError(
            f"need Hc | Hkv | H or Hkv | Hc | H for the head groups (a shared rope key has Hkv = 1); "
            f"got H={H}, Hkv={Hkv}, Hc={Hc}"
        )
    if len({q_lat.dtype, q_pe.dtype, c_kv.dtype, k_pe.dtype}) != 1:
        raise ValueError(
            f"dtypes differ: q_lat {q_lat.dtype}, q_pe {q_pe.dtype}, c_kv {c_kv.dtype}, k_pe {k_pe.dtype}; "
            "cast them to one dtype"
        )
    if kv_start is not None and tuple(kv_start.shape) != (B,):
        raise ValueError(f"kv_start must have shape ({B},), got {tuple(kv_start.shape)}")
    if kv_end is not None and kv_end.numel() != 1:
        raise ValueError(f"kv_end must hold one length (shared by the batch), got shape {tuple(kv_end.shape)}")
