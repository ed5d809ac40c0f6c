"""Triton flash-decoding kernels for `latent_decode_attention` (imported only on CUDA).

Legend as in `latent_decode`: B, T, H, Hkv, Hc, Rc, Dr, G = H // Hc heads per latent group, HPG = H // Hkv heads per
RoPE group, KPC = max(1, Hkv // Hc) RoPE groups one latent group's heads read (1 for a shared rope key), S sequence
splits.

Split kernel: program (s * NHB + j, c, b) reads tokens [s * split_tokens, (s + 1) * split_tokens) of latent group c
and scores them for the j-th block of BLOCK_H of the group's G heads with two tensor-core dots (the latent part, and
the RoPE part as a block-diagonal (BLOCK_H, KPC * Dr) query against the KPC rope keys the group's heads read, from
group c * G // HPG on), keeping an online softmax in fp32. A group's heads fit one block (NHB = 1: the tiles are read
once) unless their fp32 accumulator would not fit the registers (DeepSeek's 128 heads x 512 latent spill): then NHB
blocks of heads read the same tiles side by side in the grid, so that the repeats can hit L2. Token strides are
compile-time constants, and T and the split sizes are not specialised on, so a growing cache does not recompile. With
one split it writes the output; otherwise it writes unnormalised partials (acc, running max m, running sum l) that
the combine kernel merges. The int4 split kernel reads `GroupQuant` codes, dequantizes each tile in registers and
works on even and odd channels separately (low and high nibbles), so it never interleaves in registers; the
full-precision residual window goes through the plain split kernel into the same partial buffers.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from mha2mla_core.kernels.quant_codes import QuantizedLatentKV

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_step(s, m_i, l_i):
    """s: (heads, tokens) log2-scaled scores -> p, the rescale factor of the old state, new m and l."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _rope_columns(offs_p, KPC: tl.constexpr, DR: tl.constexpr):
    """Column p of a program's concatenated rope keys -> (rope group within the program, dim); one group (a shared
    rope key, or a per-head latent with fewer rope groups than latent groups) needs no division."""
    if KPC == 1:
        grp = offs_p * 0
        dim = offs_p
    else:
        grp = offs_p // DR
        dim = offs_p % DR
    return grp, dim


@triton.jit
def _rope_query(q_pe_row, offs_p, offs_h, h_ok, HPG: tl.constexpr, KPC: tl.constexpr, DR: tl.constexpr):
    """(BLOCK_H, len(offs_p)) block-diagonal rope query: head h only meets its own rope group's columns."""
    grp, dim = _rope_columns(offs_p, KPC, DR)
    mine = h_ok[:, None] & (offs_p < KPC * DR)[None, :] & ((offs_h // HPG)[:, None] == grp[None, :])
    return tl.load(q_pe_row + dim[None, :], mask=mine, other=0.0)


@triton.jit(do_not_specialize=["T", "pos_offset", "split_tokens", "split_base", "n_splits_total"])
def _split_kernel(
    Q_lat, Q_pe, C, K, Start, End, Out, O_part, ML_part,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_cb, stride_ch, stride_kb, stride_kh, stride_ob, stride_oh,
    T, pos_offset, split_tokens, split_base, n_splits_total, qk_scale,
    STRIDE_CT: tl.constexpr, STRIDE_KT: tl.constexpr,
    G: tl.constexpr, HPG: tl.constexpr, KPC: tl.constexpr,
    RC: tl.constexpr, RC_PAD: tl.constexpr, DR: tl.constexpr, P_PAD: tl.constexpr, P_CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr, NHB: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_START: tl.constexpr, HAS_END: tl.constexpr, DIRECT: tl.constexpr, DOT_PREC: tl.constexpr,
    LATENT_SCORES: tl.constexpr,
):
    split = tl.program_id(0) // NHB
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    H = G * tl.num_programs(1)
    offs_h = (tl.program_id(0) % NHB) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's heads, within the group
    h_ok = offs_h < G
    head = c * G + offs_h
    offs_r = tl.arange(0, RC_PAD)
    r_ok = offs_r < RC
    if LATENT_SCORES:
        q_lat = tl.load(
            Q_lat + b * stride_qb + head[:, None] * stride_qh + offs_r[None, :], mask=h_ok[:, None] & r_ok[None, :],
            other=0.0,
        )  # (BLOCK_H, RC_PAD)
    c_base = C + b * stride_cb + c * stride_ch
    k_base = K + b * stride_kb + (c * G // HPG) * stride_kh  # the first rope group this program's heads read
    q_pe_row = Q_pe + b * stride_pb + head[:, None] * stride_ph
    offs_p0 = tl.arange(0, P_CHUNK)
    q_pe0 = _rope_query(q_pe_row, offs_p0, offs_h, h_ok, HPG, KPC, DR)  # (BLOCK_H, P_CHUNK)

    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, T)
    if HAS_END:  # a static cache: slots from End on are not written yet; splits past it only write m = -inf
        hi = tl.minimum(hi, tl.load(End).to(tl.int32))
    start = 0
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32) - pos_offset
    first = lo + tl.maximum(start - lo, 0) // BLOCK_T * BLOCK_T  # skip whole tiles of left padding

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, RC_PAD], tl.float32)
    for t0 in range(first, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = (offs_t < hi) & (offs_t >= start)
        c_tile = tl.load(
            c_base + offs_t[:, None] * STRIDE_CT + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0
        )  # (BLOCK_T, RC_PAD)
        if LATENT_SCORES:
            s = tl.dot(q_lat, tl.trans(c_tile), input_precision=DOT_PREC)  # (BLOCK_H, BLOCK_T)
        else:  # grouped-query attention: the rope key is the whole key, the latent the value
            s = tl.zeros([BLOCK_H, BLOCK_T], tl.float32)
        for pc in tl.static_range(0, P_PAD, P_CHUNK):
            offs_p = pc + offs_p0
            grp, dim = _rope_columns(offs_p, KPC, DR)
            k_tile = tl.load(
                k_base + grp[None, :] * stride_kh + offs_t[:, None] * STRIDE_KT + dim[None, :],
                mask=t_ok[:, None] & (offs_p < KPC * DR)[None, :],
                other=0.0,
            )  # (BLOCK_T, P_CHUNK)
            if pc == 0:
                q_pe = q_pe0
            else:
                q_pe = _rope_query(q_pe_row, offs_p, offs_h, h_ok, HPG, KPC, DR)
            s += tl.dot(q_pe, tl.trans(k_tile), input_precision=DOT_PREC)
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_tile.dtype), c_tile, input_precision=DOT_PREC)

    if DIRECT:
        o_ptr = Out + b * stride_ob + head[:, None] * stride_oh + offs_r[None, :]
        tl.store(o_ptr, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=h_ok[:, None] & r_ok[None, :])
    else:
        row = (b * H + head) * n_splits_total + split_base + split  # (BLOCK_H,) rows of the (B, H, S) partials
        tl.store(O_part + row[:, None] * RC + offs_r[None, :], acc, mask=h_ok[:, None] & r_ok[None, :])
        tl.store(ML_part + row * 2, m_i, mask=h_ok)
        tl.store(ML_part + row * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _group_params(scale_ptr, zero_ptr, ok):
    """fp32 scale and zero of the even channels at scale_ptr / zero_ptr and of the odd ones just after each."""
    s_e = tl.load(scale_ptr, mask=ok, other=0.0).to(tl.float32)
    s_o = tl.load(scale_ptr + 1, mask=ok, other=0.0).to(tl.float32)
    z_e = tl.load(zero_ptr, mask=ok, other=0.0).to(tl.float32)
    z_o = tl.load(zero_ptr + 1, mask=ok, other=0.0).to(tl.float32)
    return s_e, s_o, z_e, z_o


@triton.jit(do_not_specialize=["T", "split_tokens", "n_splits_total"])
def _split_int4_kernel(
    Q_lat, Q_pe, Cq, Cs, Cz, Kq, Ks, Kz, Start, O_part, ML_part,
    stride_qb, stride_qh, stride_pb, stride_ph,
    stride_cqb, stride_cqh, stride_csb, stride_csh, stride_csg,
    stride_kqb, stride_kqh, stride_ksb, stride_ksh, stride_ksg,
    T, split_tokens, n_splits_total, qk_scale,
    STRIDE_CQT: tl.constexpr, STRIDE_KQT: tl.constexpr,
    G: tl.constexpr, HPG: tl.constexpr, KPC: tl.constexpr,
    RH: tl.constexpr, RH_PAD: tl.constexpr, DH: tl.constexpr, PH_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr,
    HAS_START: tl.constexpr, DOT_PREC: tl.constexpr,
):
    split = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    H = G * tl.num_programs(1)
    DTYPE = Q_lat.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < G
    head = c * G + offs_h
    offs_r = tl.arange(0, RH_PAD)  # byte j of a latent row holds channels 2j (low nibble) and 2j + 1
    r_ok = offs_r < RH
    q_ptr = Q_lat + b * stride_qb + head[:, None] * stride_qh + 2 * offs_r[None, :]
    q_e = tl.load(q_ptr, mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # (BLOCK_H, RH_PAD) even channels
    q_o = tl.load(q_ptr + 1, mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # odd channels
    offs_p = tl.arange(0, PH_PAD)  # column p: rope group grp(p), byte dim(p)
    p_ok = offs_p < KPC * DH
    grp, dim = _rope_columns(offs_p, KPC, DH)
    pe_mask = h_ok[:, None] & p_ok[None, :] & ((offs_h // HPG)[:, None] == grp[None, :])
    pe_ptr = Q_pe + b * stride_pb + head[:, None] * stride_ph + 2 * dim[None, :]
    qp_e = tl.load(pe_ptr, mask=pe_mask, other=0.0)  # (BLOCK_H, PH_PAD) block-diagonal
    qp_o = tl.load(pe_ptr + 1, mask=pe_mask, other=0.0)
    first_grp = c * G // HPG
    cq_base = Cq + b * stride_cqb + c * stride_cqh
    cs_base = b * stride_csb + c * stride_csh + 2 * offs_r  # (RH_PAD,) even-channel offsets
    kq_base = Kq + b * stride_kqb + (first_grp + grp)[None, :] * stride_kqh + dim[None, :]
    ks_base = b * stride_ksb + (first_grp + grp) * stride_ksh + 2 * dim  # (PH_PAD,)

    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, T)
    start = 0
    if HAS_START:
        start = tl.load(Start + b).to(tl.int32)
    first = lo + tl.maximum(start - lo, 0) // BLOCK_T * BLOCK_T

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_e = tl.zeros([BLOCK_H, RH_PAD], tl.float32)
    acc_o = tl.zeros([BLOCK_H, RH_PAD], tl.float32)
    for t0 in range(first, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = (offs_t < hi) & (offs_t >= start)
        g = t0 // GROUP  # a tile never straddles two quantization groups
        c_codes = tl.load(cq_base + offs_t[:, None] * STRIDE_CQT + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0)
        k_codes = tl.load(kq_base + offs_t[:, None] * STRIDE_KQT, mask=t_ok[:, None] & p_ok[None, :], other=0)
        s_e, s_o, z_e, z_o = _group_params(Cs + cs_base + g * stride_csg, Cz + cs_base + g * stride_csg, r_ok)
        ks_e, ks_o, kz_e, kz_o = _group_params(Ks + ks_base + g * stride_ksg, Kz + ks_base + g * stride_ksg, p_ok)
        x_e = (((c_codes & 15).to(tl.float32) - z_e[None, :]) * s_e[None, :]).to(DTYPE)  # (BLOCK_T, RH_PAD)
        x_o = (((c_codes >> 4).to(tl.float32) - z_o[None, :]) * s_o[None, :]).to(DTYPE)
        k_e = (((k_codes & 15).to(tl.float32) - kz_e[None, :]) * ks_e[None, :]).to(DTYPE)  # (BLOCK_T, PH_PAD)
        k_o = (((k_codes >> 4).to(tl.float32) - kz_o[None, :]) * ks_o[None, :]).to(DTYPE)
        s = tl.dot(q_e, tl.trans(x_e), input_precision=DOT_PREC)  # (BLOCK_H, BLOCK_T)
        s += tl.dot(q_o, tl.trans(x_o), input_precision=DOT_PREC)
        s += tl.dot(qp_e, tl.trans(k_e), input_precision=DOT_PREC)
        s += tl.dot(qp_o, tl.trans(k_o), input_precision=DOT_PREC)
        s = tl.where(t_ok[None, :], s * qk_scale, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax_step(s, m_i, l_i)
        p = p.to(DTYPE)
        acc_e = acc_e * alpha[:, None] + tl.dot(p, x_e, input_precision=DOT_PREC)
        acc_o = acc_o * alpha[:, None] + tl.dot(p, x_o, input_precision=DOT_PREC)

    row = (b * H + head) * n_splits_total + split
    o_ptr = O_part + row[:, None] * (2 * RH) + 2 * offs_r[None, :]
    tl.store(o_ptr, acc_e, mask=h_ok[:, None] & r_ok[None, :])
    tl.store(o_ptr + 1, acc_o, mask=h_ok[:, None] & r_ok[None, :])
    tl.store(ML_part + row * 2, m_i, mask=h_ok)
    tl.store(ML_part + row * 2 + 1, l_i, mask=h_ok)


@triton.jit
def _combine_kernel(
    O_part, ML_part, Out, stride_ob, stride_oh, H, n_splits,
    RC: tl.constexpr, RC_PAD: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """Program bh merges the n_splits partials of one (batch, head), S_BLOCK splits per step."""
    bh = tl.program_id(0).to(tl.int64)
    row0 = bh * n_splits
    offs_s = tl.arange(0, S_BLOCK)
    offs_r = tl.arange(0, RC_PAD)
    r_ok = offs_r < RC
    m_max = tl.full([S_BLOCK], float("-inf"), tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        m_s = tl.load(ML_part + (row0 + s0 + offs_s) * 2, mask=s0 + offs_s < n_splits, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_all = tl.max(m_max, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # splits that saw only padding carry m = -inf
    acc = tl.zeros([RC_PAD], tl.float32)
    l_sum = tl.zeros([S_BLOCK], tl.float32)
    for s0 in range(0, n_splits, S_BLOCK):
        rows = row0 + s0 + offs_s
        s_ok = s0 + offs_s < n_splits
        w = tl.exp2(tl.load(ML_part + rows * 2, mask=s_ok, other=float("-inf")) - m_all)  # (S_BLOCK,)
        l_sum += w * tl.load(ML_part + rows * 2 + 1, mask=s_ok, other=0.0)
        o = tl.load(O_part + rows[:, None] * RC + offs_r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    b = bh // H
    h = bh % H
    out = acc / tl.sum(l_sum, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_r, out.to(Out.dtype.element_ty), mask=r_ok)


_SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (H100 / H200: 227 KB of shared memory per block)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile and grid choice of one decode call; `programs_per_sm` sets how finely T is split."""

    block_t: int
    num_warps: int
    num_stages: int
    programs_per_sm: float = 2.0
    min_split_tokens: int = 256
    max_block_h: int | None = None  # heads per program (a power of 2, >= 16); None: as many as HEAD_BLOCK_BUDGET allows


HEAD_BLOCK_BUDGET = 16384  # fp32 accumulator elements per program (heads x padded latent): 128 registers a thread at
# 4 warps. Every bench shape but DeepSeek's 128 heads fits one block (Llama-2-7B shared: 32 x 512)


def head_blocks(G: int, Rc: int, cfg: LaunchConfig) -> tuple[int, int]:
    """(BLOCK_H, NHB): heads per program and programs per latent group for G heads of an Rc-wide latent."""
    cap = cfg.max_block_h or max(16, HEAD_BLOCK_BUDGET // _pow2(Rc))
    block_h = min(_pow2(G), _pow2(cap))
    return block_h, triton.cdiv(G, block_h)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _rope_groups_per_program(Hc: int, Hkv: int) -> int:
    """Rope-key groups the heads of one latent group read: Hkv // Hc, or 1 when there are fewer rope groups than
    latent groups (a shared rope key)."""
    return max(1, Hkv // Hc)


def default_config(q_lat: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> LaunchConfig:
    """Tiles of about 24 KB of cache, and at least 64 tokens where two stages of them fit 200 KB; as many stages as
    fit, at most 3. (`_decode` then sizes the splits: long enough that their partials stay cheap.)

    From sweeps on an H100 and an H200 (bench/decode_sweep.py; docs/RESULTS.md). SmolLM2's shapes take 128-token tiles
    and 3 stages. A 512-wide latent (Llama-2-7B's 32 heads, DeepSeek's 512 + 64) took 32-token tiles before: 64-token
    tiles on 2 stages, about 17 splits a row, ran 1.4x and 1.2x faster on the H200 at B=16, T=16k and B=64, T=32k.
    8 warps, or 1-2, never beat 4.
    """
    Hc, Rc, Hkv, Dr = c_kv.shape[1], c_kv.shape[3], k_pe.shape[1], k_pe.shape[3]
    bytes_per_token = _tile_bytes_per_token(c_kv, Rc, Hc, Hkv, Dr)
    block_t = min(128, 2 ** int(math.log2(max(1, 24576 // bytes_per_token))))
    if block_t < 64:
        block_t = next((t for t in (64, 32) if 2 * t * bytes_per_token <= _SMEM_BUDGET), 16)
    stages = next((s for s in (3, 2) if s * block_t * bytes_per_token <= _SMEM_BUDGET), 1)
    return LaunchConfig(block_t=block_t, num_warps=4, num_stages=stages, programs_per_sm=8.0)


def _tile_bytes_per_token(c_kv: torch.Tensor, Rc: int, Hc: int, Hkv: int, Dr: int) -> int:
    """Bytes of one token's padded latent and rope rows in a program's tiles."""
    return (_pow2(Rc) + _pow2(_rope_groups_per_program(Hc, Hkv) * Dr)) * c_kv.element_size()


PARTIALS_SHARE = 0.1  # splits are kept long enough that their partials cost at most this share of the cache bytes


def _partials_min_tokens(G: int, Rc: int, bytes_per_token: int) -> int:
    """Tokens a split needs so that its partials (G heads x Rc fp32, written, then read by the combine) cost at most
    PARTIALS_SHARE of the cache it reads: 180 for SmolLM2's 9 heads x 48, 1,138 for 32 heads x 512."""
    return math.ceil(2 * 4 * G * Rc / (PARTIALS_SHARE * bytes_per_token))


def _num_splits(
    B: int, Hc: int, T: int, cfg: LaunchConfig, device: torch.device, partials_tokens: int = 0
) -> tuple[int, int]:
    """(splits, tokens per split): enough programs to fill the SMs, no split shorter than min_split_tokens, nor than
    partials_tokens while the programs still cover every SM once. Hc counts the programs per batch row and split
    (latent groups x head blocks)."""
    sms = _num_sms(device.index or 0)
    want = math.ceil(cfg.programs_per_sm * sms / (B * Hc))
    cap = T // cfg.min_split_tokens
    if partials_tokens:
        cap = min(cap, max(T // partials_tokens, math.ceil(sms / (B * Hc))))
    splits = max(1, min(want, cap))
    split_tokens = triton.cdiv(triton.cdiv(T, splits), cfg.block_t) * cfg.block_t
    return triton.cdiv(T, split_tokens), split_tokens


def _check_last_dim_contiguous(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {t.stride()}")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@dataclass(frozen=True)
class _Partials:
    """Unnormalised per-split results, (B, H, S, Rc) fp32 and (B, H, S, [m, l]); a launch fills `splits` of them
    from index `base` on."""

    o: torch.Tensor
    ml: torch.Tensor
    base: int
    splits: int

    @staticmethod
    def empty(B: int, H: int, S: int, Rc: int, device: torch.device) -> "_Partials":
        o = torch.empty(B, H, S, Rc, device=device, dtype=torch.float32)  # (B, H, S, Rc)
        ml = torch.empty(B, H, S, 2, device=device, dtype=torch.float32)  # (B, H, S, [m, l])
        return _Partials(o, ml, 0, S)


def _launch_split(
    q_lat, q_pe, c_kv, k_pe, scale, kv_start, cfg, parts: _Partials | None, pos_offset=0, kv_end=None,
    latent_scores=True,
):
    """Run `_split_kernel` over c_kv/k_pe (up to kv_end when given): into `parts`, or straight to the output when
    parts is None. Without latent_scores q_lat is never read (only its shape and strides are used)."""
    B, H, Rc = q_lat.shape
    Hc, T, Hkv, Dr = c_kv.shape[1], c_kv.shape[2], k_pe.shape[1], k_pe.shape[3]
    G, KPC = H // Hc, _rope_groups_per_program(Hc, Hkv)
    block_h, nhb = head_blocks(G, Rc, cfg)
    splits = 1 if parts is None else parts.splits
    split_tokens = triton.cdiv(triton.cdiv(T, splits), cfg.block_t) * cfg.block_t
    p_pad = _pow2(KPC * Dr)
    out = torch.empty_like(q_lat) if parts is None else q_lat  # Out is unused with partials
    o_part, ml_part = (out, out) if parts is None else (parts.o, parts.ml)
    _split_kernel[(splits * nhb, Hc, B)](
        q_lat, q_pe, c_kv, k_pe, kv_start if kv_start is not None else q_lat, kv_end if kv_end is not None else q_lat,
        out, o_part, ml_part,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        c_kv.stride(0), c_kv.stride(1), k_pe.stride(0), k_pe.stride(1), out.stride(0), out.stride(1),
        T, pos_offset, split_tokens, 0 if parts is None else parts.base, o_part.shape[2], scale * LOG2E,
        STRIDE_CT=c_kv.stride(2), STRIDE_KT=k_pe.stride(2),  # constants: the compiler then sees aligned rows
        G=G, HPG=H // Hkv, KPC=KPC, RC=Rc, RC_PAD=_pow2(Rc), DR=Dr, P_PAD=p_pad, P_CHUNK=min(p_pad, 128),
        BLOCK_H=block_h, NHB=nhb, BLOCK_T=cfg.block_t,
        HAS_START=kv_start is not None, HAS_END=kv_end is not None, DIRECT=parts is None,
        DOT_PREC=_dot_precision(q_lat.dtype), LATENT_SCORES=latent_scores,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def _combine(o_part: torch.Tensor, ml_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    B, H, S, Rc = o_part.shape
    s_block = min(_pow2(S, floor=2), max(2, 8192 // _pow2(Rc)))
    _combine_kernel[(B * H,)](
        o_part, ml_part, out, out.stride(0), out.stride(1), H, S, RC=Rc, RC_PAD=_pow2(Rc), S_BLOCK=s_block
    )
    return out


def _with_smaller_tiles_on_overflow(run, cfg: LaunchConfig) -> torch.Tensor:
    """run(cfg); if the kernel needs more shared memory than the GPU has (fp32 operands take about twice the
    estimate of the default configs), retry with fewer pipeline stages, then with half the tokens per tile."""
    while True:
        try:
            return run(cfg)
        except OutOfResources:
            if cfg.num_stages > 1:
                cfg = replace(cfg, num_stages=cfg.num_stages - 1)
            elif cfg.block_t > 16:
                cfg = replace(cfg, block_t=cfg.block_t // 2)
            else:
                raise


def decode(
    q_lat, q_pe, c_kv, k_pe, scale: float, kv_start=None, kv_end=None, cfg: LaunchConfig | None = None
) -> torch.Tensor:
    """Triton `latent_decode_attention`: flash-decoding split over T, then a combine when split.

    The grid depends only on the shapes, never on kv_start/kv_end's values, so a step can be captured in a CUDA graph.
    """
    _check_last_dim_contiguous(q_lat=q_lat, q_pe=q_pe, c_kv=c_kv, k_pe=k_pe)
    run = functools.partial(_decode, q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end)
    return _with_smaller_tiles_on_overflow(run, cfg or default_config(q_lat, c_kv, k_pe))


def grouped_decode(q, k, v, scale: float, kv_start=None, kv_end=None, cfg: LaunchConfig | None = None) -> torch.Tensor:
    """One decode step of grouped-query attention, q (B, H, D), k (B, Hkv, T, D), v (B, Hkv, T, Dv) -> (B, H, Dv).

    It is the split kernel with no latent scores: k takes the rope key's place (every dim of it), v the latent's, so
    each program reads a K/V head's tiles once for its H // Hkv query heads, and only up to kv_end.
    """
    _check_last_dim_contiguous(q=q, k=k, v=v)
    out_like = q.new_empty(q.shape[0], q.shape[1], v.shape[3])  # (B, H, Dv): the output's shape; never read
    run = functools.partial(_decode, out_like, q, v, k, scale, kv_start, kv_end, latent_scores=False)
    return _with_smaller_tiles_on_overflow(run, cfg or default_config(out_like, v, k))


def _decode(q_lat, q_pe, c_kv, k_pe, scale, kv_start, kv_end, cfg: LaunchConfig, latent_scores=True) -> torch.Tensor:
    B, H, Rc = q_lat.shape
    Hc, Hkv, Dr = c_kv.shape[1], k_pe.shape[1], k_pe.shape[3]
    block_h, nhb = head_blocks(H // Hc, Rc, cfg)
    partials = _partials_min_tokens(min(block_h, H // Hc), Rc, _tile_bytes_per_token(c_kv, Rc, Hc, Hkv, Dr))
    splits, _ = _num_splits(B, Hc * nhb, c_kv.shape[2], cfg, c_kv.device, partials)
    launch = functools.partial(_launch_split, q_lat, q_pe, c_kv, k_pe, scale, kv_start, cfg, kv_end=kv_end,
                               latent_scores=latent_scores)  # fmt: skip
    if splits == 1:
        return launch(parts=None)
    parts = _Partials.empty(B, H, splits, Rc, q_lat.device)
    launch(parts=parts)
    return _combine(parts.o, parts.ml, torch.empty_like(q_lat))


def default_config_int4(q_lat: torch.Tensor, kv: QuantizedLatentKV) -> LaunchConfig:
    """32-token tiles. A narrow latent (SmolLM2's 48) runs one warp a program and 16 programs per SM: on an H200
    1.38-1.44x faster than 64-token tiles on 4 warps at B=16, T=16k and B=64, T=32k (bench/decode_sweep.py); a wide
    one keeps 4 warps and 8 programs per SM."""
    narrow = q_lat.shape[2] <= 64
    return LaunchConfig(block_t=min(32, kv.c_kv.group_size), num_warps=1 if narrow else 4, num_stages=3,
                        programs_per_sm=16.0 if narrow else 8.0)


def decode_int4(q_lat, q_pe, kv: QuantizedLatentKV, scale: float, kv_start=None, cfg: LaunchConfig | None = None):
    """Triton `latent_decode_attention_quantized` for int4 codes plus a full-precision residual window."""
    cq, kq = kv.c_kv, kv.k_pe
    _check_last_dim_contiguous(q_lat=q_lat, q_pe=q_pe, c_codes=cq.codes, c_scale=cq.scale, k_codes=kq.codes, k_scale=kq.scale)
    if cq.scale.stride() != cq.zero.stride() or kq.scale.stride() != kq.zero.stride() or cq.group_size != kq.group_size:
        raise ValueError("int4 kernel needs scale and zero with equal strides and one group_size for c_kv and k_pe")
    run = functools.partial(_decode_int4, q_lat, q_pe, kv, scale, kv_start)
    return _with_smaller_tiles_on_overflow(run, cfg or default_config_int4(q_lat, kv))


def _decode_int4(q_lat, q_pe, kv: QuantizedLatentKV, scale, kv_start, cfg: LaunchConfig) -> torch.Tensor:
    cq, kq = kv.c_kv, kv.k_pe
    if cq.group_size % cfg.block_t:
        raise ValueError(f"block_t={cfg.block_t} must divide group_size={cq.group_size}")
    B, H, Rc = q_lat.shape
    Hc, Tq, Hkv, Dr = cq.codes.shape[1], cq.num_tokens, kq.codes.shape[1], kq.scale.shape[3]
    G, KPC = H // Hc, _rope_groups_per_program(Hc, Hkv)
    splits, split_tokens = _num_splits(B, Hc, Tq, cfg, q_lat.device)
    n_res = 1 if kv.c_kv_residual.shape[2] > 0 else 0  # the residual window is one more split
    parts = _Partials.empty(B, H, splits + n_res, Rc, q_lat.device)
    o_part, ml_part = parts.o, parts.ml
    _split_int4_kernel[(splits, Hc, B)](
        q_lat, q_pe, cq.codes, cq.scale, cq.zero, kq.codes, kq.scale, kq.zero,
        kv_start if kv_start is not None else q_lat, o_part, ml_part,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        cq.codes.stride(0), cq.codes.stride(1), cq.scale.stride(0), cq.scale.stride(1), cq.scale.stride(2),
        kq.codes.stride(0), kq.codes.stride(1), kq.scale.stride(0), kq.scale.stride(1), kq.scale.stride(2),
        Tq, split_tokens, splits + n_res, scale * LOG2E,
        STRIDE_CQT=cq.codes.stride(2), STRIDE_KQT=kq.codes.stride(2),
        G=G, HPG=H // Hkv, KPC=KPC, RH=Rc // 2, RH_PAD=_pow2(Rc // 2), DH=Dr // 2, PH_PAD=_pow2(KPC * Dr // 2),
        BLOCK_H=_pow2(G), BLOCK_T=cfg.block_t, GROUP=cq.group_size,
        HAS_START=kv_start is not None, DOT_PREC=_dot_precision(q_lat.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if n_res:  # at most residual_length + group_size tokens: the int4 tiles suit them too
        res_parts = _Partials(o_part, ml_part, base=splits, splits=1)
        _launch_split(q_lat, q_pe, kv.c_kv_residual, kv.k_pe_residual, scale, kv_start, cfg, res_parts, Tq)
    return _combine(o_part, ml_part, torch.empty_like(q_lat))
