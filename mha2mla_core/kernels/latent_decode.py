"""One decode step of absorbed MLA attention over a latent KV cache.

Legend: B batch, T cached tokens, H query heads, Hkv RoPE-key groups (1 for a rope key shared by all heads), Hc latent
groups (Hc = Hkv for the per-head layout, 1 for the shared layout), Rc latent width of one group, Dr kept RoPE dims,
G = H // Hc heads per latent group. One of Hc, Hkv divides the other.

Head h scores token t as  scale * (q_lat[h] . c_kv[h // (H // Hc), t] + q_pe[h] . k_pe[h // (H // Hkv), t])  and
returns the softmax-weighted sum of its group's latents; W_uv is applied by the caller. On CUDA the step runs in the
Triton kernels of `mha2mla_core.kernels.triton_latent` (one program per latent group and sequence split reads each
latent tile once for all G heads); elsewhere it runs in `latent_decode_attention_reference`.

The quantized cache's layout (`GroupQuant` codes, `QuantizedLatentKV`) lives in `mha2mla_core.kernels.quant_codes`,
shared by the cache that writes it and the kernels that read it.
"""

from __future__ import annotations

import importlib.util

import torch

from mha2mla_core.kernels.quant_codes import QuantizedLatentKV

_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # a constant, so torch.compile traces the dispatch


def triton_available() -> bool:
    return _HAS_TRITON and torch.cuda.is_available()


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
    if c_kv.is_cuda and c_kv.dtype in _TRITON_DTYPES and _HAS_TRITON:
        return torch.ops.mha2mla.latent_decode(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)
    return latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)


def grouped_query_decode(q, k, v, scale: float, kv_start=None, kv_end=None) -> torch.Tensor:
    """One decode step of grouped-query attention over a K/V cache, read once per K/V head and only up to kv_end.

    q (B, H, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv); kv_start / kv_end as in `latent_decode_attention`
    returns (B, H, Dv) = softmax(scale * q.k) @ v for head h's K/V head h // (H // Hkv)

    It is `latent_decode_attention` with no latent scores: k stands where the rope key does, v where the latent does.
    """
    B, H, _ = q.shape
    out_like = q.new_zeros(()).expand(B, H, v.shape[3])  # (B, H, Dv): a latent query of zeros scores nothing
    _check_decode_inputs(out_like, q, v, k, kv_start, kv_end)
    if v.is_cuda and v.dtype in _TRITON_DTYPES and _HAS_TRITON:
        return torch.ops.mha2mla.grouped_decode(q, k, v, scale, kv_start, kv_end)
    return latent_decode_attention_reference(out_like, q, v, k, scale, kv_start, kv_end)


# The Triton launches as torch ops: torch.compile sees one opaque op (its output shape from the fake), so a compiled
# model keeps one graph around the decode kernels instead of breaking at them.
@torch.library.custom_op("mha2mla::latent_decode", mutates_args=())
def _latent_decode_op(
    q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, scale: float,
    kv_start: torch.Tensor | None, kv_end: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    from mha2mla_core.kernels import triton_latent

    return triton_latent.decode(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)


@_latent_decode_op.register_fake
def _(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end):
    return torch.empty_like(q_lat)  # (B, H, Rc)


@torch.library.custom_op("mha2mla::grouped_decode", mutates_args=())
def _grouped_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kv_start: torch.Tensor | None,
    kv_end: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    from mha2mla_core.kernels import triton_latent

    return triton_latent.grouped_decode(q, k, v, scale, kv_start, kv_end)


@_grouped_decode_op.register_fake
def _(q, k, v, scale, kv_start, kv_end):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[3])  # (B, H, Dv)


def latent_decode_attention_quantized(q_lat, q_pe, kv: QuantizedLatentKV, scale: float, kv_start=None):
    """`latent_decode_attention` over a quantized layer; int4 codes are dequantized inside the kernel on CUDA."""
    c_res, k_res = kv.c_kv_residual, kv.k_pe_residual
    _check_decode_inputs(q_lat, q_pe, c_res, k_res, kv_start)
    fused = kv.c_kv.nbits == 4 and kv.k_pe.nbits == 4 and kv.c_kv.num_tokens > 0
    if fused and c_res.is_cuda and c_res.dtype in _TRITON_DTYPES and _HAS_TRITON:
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
