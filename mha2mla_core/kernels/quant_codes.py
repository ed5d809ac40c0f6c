"""The int4/int2 code layout of the quantized latent cache, shared by the cache that writes it
(`mha2mla_core.modeling.latent_cache`) and the decode kernels that read it (`mha2mla_core.kernels`).

Legend: B batch, T cached tokens, Tq quantized tokens, Hx heads of the quantized tensor (Hc latent groups for c_kv,
Hkv RoPE-key groups for k_pe), D channels, Rc latent dims per group, Dr kept RoPE dims.

The quantized cache stores its old tokens as `GroupQuant` codes (the layout the int4 kernel reads) and the most recent
ones in full precision; `QuantizedLatentKV` is one layer's worth of that state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
