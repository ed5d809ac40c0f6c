"""Latent decode attention: the torch reference against expanded attention (CPU), the Triton kernels against the
reference: compiled on a GPU (skipped without CUDA + Triton), and through Triton's interpreter on the CPU."""

import math
import re
from dataclasses import replace

import pytest
import torch

from mha2mla_core.kernels import (
    GroupQuant,
    QuantizedLatentKV,
    dequantize_group,
    grouped_query_decode,
    latent_decode_attention,
    latent_decode_attention_quantized,
    latent_decode_attention_reference,
    triton_available,
)
from mha2mla_core.kernels.quant_codes import pack_codes, unpack_codes

requires_gpu = pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")

# (H, Hkv, Hc, Rc, Dr): SmolLM2-135M shared / per-head latents, Llama-2-7B per-head / shared; "-rope" shapes share one
# rope key among all heads (Hkv = 1), with a shared latent or with per-head latents (Hkv < Hc); the last is DeepSeek's
SHAPES = {
    "smollm2-shared": (9, 3, 1, 48, 8),
    "smollm2-shared-rope": (9, 1, 1, 48, 24),
    "smollm2-per_head": (9, 3, 3, 16, 8),
    "smollm2-per_head-rope": (9, 1, 3, 16, 8),
    "smollm2-r64-shared-rope": (9, 1, 1, 192, 24),  # the recipes' latent since session 15 (rank 64 per KV head)
    "llama2-7b-per_head": (32, 32, 32, 64, 32),
    "llama2-7b-shared": (32, 32, 1, 512, 32),
    "llama2-7b-shared-rope": (32, 1, 1, 512, 64),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(B, T, shape, dtype=torch.float32, device="cpu", slack=0):
    """Random decode inputs; c_kv/k_pe are views of buffers `slack` tokens longer, as a growing cache's would be."""
    H, Hkv, Hc, Rc, Dr = shape
    q_lat = torch.randn(B, H, Rc, dtype=dtype, device=device)  # (B, H, Rc)
    q_pe = torch.randn(B, H, Dr, dtype=dtype, device=device)  # (B, H, Dr)
    c_kv = torch.randn(B, Hc, T + slack, Rc, dtype=dtype, device=device)[:, :, :T]  # (B, Hc, T, Rc)
    k_pe = torch.randn(B, Hkv, T + slack, Dr, dtype=dtype, device=device)[:, :, :T]  # (B, Hkv, T, Dr)
    return q_lat, q_pe, c_kv, k_pe


def _expanded_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale):
    """Naive MLA: materialise every head's keys [c W_uk | k_pe] and values c W_uv, then softmax attention.

    q_nope (B, H, Dn), w_uk (H, Rc, Dn), w_uv (H, Rc, Dv) -> (B, H, Dv)
    """
    B, H, _ = q_nope.shape
    Hc, Hkv = c_kv.shape[1], k_pe.shape[1]
    c_h = c_kv.repeat_interleave(H // Hc, dim=1)  # (B, H, T, Rc)
    k_nope = torch.einsum("bhtr,hrd->bhtd", c_h, w_uk)  # (B, H, T, Dn)
    keys = torch.cat([k_nope, k_pe.repeat_interleave(H // Hkv, dim=1)], dim=-1)  # (B, H, T, Dn + Dr)
    values = torch.einsum("bhtr,hrd->bhtd", c_h, w_uv)  # (B, H, T, Dv)
    query = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, Dn + Dr)
    probs = torch.softmax(torch.einsum("bhd,bhtd->bht", query, keys) * scale, dim=-1)  # (B, H, T)
    return torch.einsum("bht,bhtd->bhd", probs, values)  # (B, H, Dv)


@pytest.mark.parametrize("layout", ["smollm2-shared", "smollm2-per_head", "smollm2-shared-rope", "smollm2-per_head-rope"])
def test_reference_equals_expanded_attention(layout):
    H, Hkv, Hc, Rc, Dr = SHAPES[layout]
    Dn, Dv, B, T = 56, 64, 2, 37
    _, q_pe, c_kv, k_pe = _inputs(B, T, SHAPES[layout], dtype=torch.float64)
    q_nope = torch.randn(B, H, Dn, dtype=torch.float64)
    w_uk = torch.randn(H, Rc, Dn, dtype=torch.float64) / math.sqrt(Rc)
    w_uv = torch.randn(H, Rc, Dv, dtype=torch.float64) / math.sqrt(Rc)
    scale = 1 / math.sqrt(Dn + Dr)
    q_lat = torch.einsum("bhd,hrd->bhr", q_nope, w_uk)  # (B, H, Rc): W_uk absorbed into the query
    o_lat = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale)  # (B, H, Rc)
    absorbed = torch.einsum("bhr,hrd->bhd", o_lat, w_uv)  # (B, H, Dv): W_uv absorbed into the output
    expected = _expanded_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale)
    torch.testing.assert_close(absorbed, expected, atol=1e-5, rtol=1e-5)  # the reference computes in fp32


def test_reference_left_padding_equals_unpadded_suffix():
    B, T, start = 3, 40, torch.tensor([0, 5, 39], dtype=torch.int32)
    q_lat, q_pe, c_kv, k_pe = _inputs(B, T, SHAPES["smollm2-shared"])
    padded = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.3, start)
    for b in range(B):
        s = int(start[b])
        alone = latent_decode_attention_reference(q_lat[b : b + 1], q_pe[b : b + 1], c_kv[b : b + 1, :, s:], k_pe[b : b + 1, :, s:], 0.3)
        torch.testing.assert_close(padded[b : b + 1], alone)


@pytest.mark.parametrize("layout", ["smollm2-per_head", "smollm2-per_head-rope", "llama2-7b-shared-rope"])
def test_cpu_dispatch_uses_reference(layout):
    q_lat, q_pe, c_kv, k_pe = _inputs(2, 9, SHAPES[layout])
    torch.testing.assert_close(
        latent_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.5), latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.5)
    )


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 9, 48), (2, 9, 8), (2, 1, 5, 48), (2, 3, 6, 8)), "tokens"),
        (((2, 9, 48), (2, 9, 8), (2, 2, 5, 48), (2, 3, 5, 8)), re.escape("Hc | Hkv | H")),
        (((2, 12, 48), (2, 12, 8), (2, 4, 5, 48), (2, 6, 5, 8)), re.escape("Hkv | Hc | H")),
        (((2, 9, 48), (2, 9, 8), (2, 1, 5, 32), (2, 3, 5, 8)), "shape mismatch"),
    ],
)
def test_bad_shapes_raise(shapes, match):
    tensors = [torch.zeros(s) for s in shapes]
    with pytest.raises(ValueError, match=match):
        latent_decode_attention(*tensors, scale=1.0)


@pytest.mark.parametrize("nbits", [2, 4])
def test_pack_unpack_round_trip(nbits):
    codes = torch.randint(0, 2**nbits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, nbits)
    assert packed.shape == (2, 3, 5, 16 * nbits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, nbits), codes)
    if nbits == 4:
        assert torch.equal(packed, codes[..., 0::2] | (codes[..., 1::2] << 4))  # the layout the int4 kernel reads


def _random_int4(B, Hx, Tq, D, group, dtype, device):
    """Random int4 `GroupQuant` codes with plausible scales and zeros (the kernel does not care where they came from)."""
    codes = torch.randint(0, 16, (B, Hx, Tq, D), dtype=torch.uint8, device=device)
    scale = (torch.rand(B, Hx, Tq // group, D, device=device) * 0.3 + 0.02).to(dtype)
    zero = (torch.rand(B, Hx, Tq // group, D, device=device) * 15).to(dtype)
    return GroupQuant(pack_codes(codes, 4), scale, zero, nbits=4, group_size=group)


def _random_quantized_kv(B, Tq, T_res, shape, dtype, device, group=64):
    H, Hkv, Hc, Rc, Dr = shape
    _, _, c_res, k_res = _inputs(B, T_res, shape, dtype, device)
    return QuantizedLatentKV(
        _random_int4(B, Hc, Tq, Rc, group, dtype, device), _random_int4(B, Hkv, Tq, Dr, group, dtype, device), c_res, k_res
    )


def test_quantized_reference_path_dequantizes():
    kv = _random_quantized_kv(2, 128, 7, SHAPES["smollm2-shared"], torch.float32, "cpu")
    q_lat, q_pe, _, _ = _inputs(2, 1, SHAPES["smollm2-shared"])
    c_kv, k_pe = kv.dequantize()
    assert c_kv.shape == (2, 1, 135, 48) and torch.equal(c_kv[:, :, :128], dequantize_group(kv.c_kv))
    torch.testing.assert_close(
        latent_decode_attention_quantized(q_lat, q_pe, kv, 0.2),
        latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.2),
    )


TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("B", "T"), [(1, 5000), (3, 333), (16, 70)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.gpu
@requires_gpu
def test_triton_matches_reference(layout, dtype, B, T, padded):
    q_lat, q_pe, c_kv, k_pe = _inputs(B, T, SHAPES[layout], dtype, "cuda", slack=13)
    scale = 1 / math.sqrt(64)
    kv_start = torch.randint(0, T, (B,), dtype=torch.int32, device="cuda") if padded else None
    out = latent_decode_attention(q_lat, q_pe, c_kv, k_pe, scale, kv_start)
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale, kv_start)
    assert out.dtype == dtype and out.shape == q_lat.shape
    torch.testing.assert_close(out, ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (H, Hkv, Hc, Rc, Dr), heads per program: DeepSeek's 128 heads in the default's 32-head blocks; 32 and 48 heads in
# blocks of 16 and 32 (the last one half empty)
HEAD_BLOCKED = [((128, 1, 1, 512, 64), None), ((32, 32, 1, 512, 32), 16), ((48, 1, 1, 48, 24), 32)]


@pytest.mark.parametrize(("shape", "max_block_h"), HEAD_BLOCKED)
@pytest.mark.parametrize(("B", "T"), [(1, 5000), (3, 333)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.gpu
@requires_gpu
def test_triton_head_blocks_match_reference(shape, max_block_h, B, T, padded):
    from mha2mla_core.kernels import triton_latent  # noqa: PLC0415 - imports triton

    q_lat, q_pe, c_kv, k_pe = _inputs(B, T, shape, torch.bfloat16, "cuda")
    cfg = triton_latent.default_config(q_lat, c_kv, k_pe)
    if max_block_h is not None:
        cfg = replace(cfg, max_block_h=max_block_h)
    assert triton_latent.head_blocks(shape[0] // shape[2], shape[3], cfg)[1] > 1  # more than one block of heads
    kv_start = torch.randint(0, T, (B,), dtype=torch.int32, device="cuda") if padded else None
    out = triton_latent.decode(q_lat, q_pe, c_kv, k_pe, 0.125, kv_start, cfg=cfg)
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.125, kv_start)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "Tq", "T_res"), [(1, 8192, 100), (4, 640, 0), (16, 64, 129)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.gpu
@requires_gpu
def test_triton_int4_matches_dequantized_reference(layout, dtype, B, Tq, T_res, padded):
    kv = _random_quantized_kv(B, Tq, T_res, SHAPES[layout], dtype, "cuda")
    q_lat, q_pe, _, _ = _inputs(B, 1, SHAPES[layout], dtype, "cuda")
    scale = 1 / math.sqrt(64) / 4  # dequantized latents are ~10x larger than randn
    kv_start = torch.randint(0, Tq + T_res, (B,), dtype=torch.int32, device="cuda") if padded else None
    out = latent_decode_attention_quantized(q_lat, q_pe, kv, scale, kv_start)
    c_kv, k_pe = kv.dequantize()
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale, kv_start)
    rel = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert rel < {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype], f"relative error {rel:.2e}"


def _gqa_inputs(B, T, H=9, Hkv=3, D=64, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, H, D, dtype=dtype, device=device)  # (B, H, D)
    k = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)  # (B, Hkv, T, D)
    v = torch.randn(B, Hkv, T, D, dtype=dtype, device=device)  # (B, Hkv, T, D)
    return q, k, v


def _sdpa_gqa(q, k, v, scale, start, end):
    """softmax(scale q.k) v over keys [start[b], end) of each row, through torch's SDPA with K/V expanded."""
    B, H, D = q.shape
    T = k.shape[2]
    positions = torch.arange(T)
    allowed = (positions[None, :] >= start[:, None]) & (positions[None, :] < end)  # (B, T)
    rep = H // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(), k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float(),
        attn_mask=allowed[:, None, None, :], scale=scale,
    )  # (B, H, 1, D)
    return out[:, :, 0].to(q.dtype)


def test_grouped_query_decode_equals_attention_over_the_written_slots():
    q, k, v = _gqa_inputs(3, 40)
    start, end = torch.tensor([0, 5, 11], dtype=torch.int32), torch.tensor([29])
    k[:, :, 29:], v[:, :, 29:] = 1e4, -1e4  # unwritten slots of a static cache: never read
    expected = _sdpa_gqa(q, k, v, 0.125, start, 29)
    torch.testing.assert_close(grouped_query_decode(q, k, v, 0.125, start, end), expected)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("B", "T", "end"), [(1, 5000, 4999), (512, 1024, 515), (16, 4096, 1)])
def test_triton_grouped_decode_matches_reference(dtype, B, T, end):
    q, k, v = _gqa_inputs(B, T, dtype=dtype, device="cuda")
    start = torch.randint(0, max(1, end // 2), (B,), dtype=torch.int32, device="cuda")
    kv_end = torch.tensor([end], device="cuda")
    expected = _sdpa_gqa(q.cpu(), k.cpu(), v.cpu(), 0.125, start.cpu(), end)
    got = grouped_query_decode(q, k, v, 0.125, start, kv_end)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.cpu(), expected, **tol)


# ---- the Triton kernels on the CPU, through Triton's interpreter ----------------------------------------------------
@pytest.fixture
def interpreted(monkeypatch):
    """`triton_latent` with its kernels in Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets on
    a machine without CUDA): they run on CPU tensors, one program at a time in numpy, so the CPU suite checks their
    logic (splits, masks, left padding, head blocks, int4 codes) without a GPU. Triton >= 3.9: 3.6's interpreter
    fails with numpy 2.4."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (scripts/setup.sh installs it)")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip(f"Triton {triton.__version__}'s interpreter predates numpy 2.4")
    from triton.runtime.interpreter import InterpretedFunction  # noqa: PLC0415

    from mha2mla_core.kernels import triton_latent  # noqa: PLC0415 - imports triton

    if not isinstance(triton_latent._split_kernel, InterpretedFunction):
        pytest.skip("the kernels are compiled here (TRITON_INTERPRET was unset when Triton was imported)")
    monkeypatch.setattr(triton_latent, "_num_sms", lambda device_index: 8)  # no GPU to ask: still several splits
    return triton_latent


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize(("B", "T"), [(1, 1100), (3, 333)])
@pytest.mark.parametrize("padded", [False, True])
def test_interpreted_kernel_matches_reference(interpreted, layout, B, T, padded):
    q_lat, q_pe, c_kv, k_pe = _inputs(B, T, SHAPES[layout], slack=13)
    kv_start = torch.randint(0, T, (B,), dtype=torch.int32) if padded else None
    out = interpreted.decode(q_lat, q_pe, c_kv, k_pe, 0.125, kv_start)
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.125, kv_start)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_interpreted_kernel_reads_only_up_to_kv_end_and_in_head_blocks(interpreted):
    q_lat, q_pe, c_kv, k_pe = _inputs(2, 700, (128, 1, 1, 512, 64))  # DeepSeek's 128 heads: blocks of 32
    cfg = interpreted.default_config(q_lat, c_kv, k_pe)
    assert interpreted.head_blocks(128, 512, cfg) == (32, 4)
    c_kv[:, :, 500:], k_pe[:, :, 500:] = 1e4, -1e4  # unwritten slots of a static cache: never read
    out = interpreted.decode(q_lat, q_pe, c_kv, k_pe, 0.125, kv_end=torch.tensor([500]), cfg=cfg)
    ref = latent_decode_attention_reference(q_lat, q_pe, c_kv[:, :, :500], k_pe[:, :, :500], 0.125)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layout", ["smollm2-shared", "smollm2-shared-rope", "smollm2-per_head", "smollm2-r64-shared-rope"])
@pytest.mark.parametrize("padded", [False, True])
def test_interpreted_int4_kernel_matches_dequantized_reference(interpreted, layout, padded):
    kv = _random_quantized_kv(2, 320, 37, SHAPES[layout], torch.float32, "cpu")
    q_lat, q_pe, _, _ = _inputs(2, 1, SHAPES[layout])
    kv_start = torch.randint(0, 357, (2,), dtype=torch.int32) if padded else None
    out = interpreted.decode_int4(q_lat, q_pe, kv, 0.03, kv_start)
    c_kv, k_pe = kv.dequantize()
    torch.testing.assert_close(out, latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.03, kv_start))


def test_interpreted_grouped_decode_matches_attention_over_the_written_slots(interpreted):
    q, k, v = _gqa_inputs(3, 600)
    start, end = torch.tensor([0, 50, 301], dtype=torch.int32), torch.tensor([450])
    got = interpreted.grouped_decode(q, k, v, 0.125, start, end)
    torch.testing.assert_close(got, _sdpa_gqa(q, k, v, 0.125, start, 450), atol=1e-5, rtol=1e-5)
