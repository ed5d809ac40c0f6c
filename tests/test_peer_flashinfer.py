"""bench/peer_flashinfer.py's CPU parts: our latent cache viewed as FlashInfer's MLA pages is the same attention."""

import math

import pytest
import torch

from bench.peer_flashinfer import SHAPES, paged_layout, paged_reference, parse_point
from mha2mla_core.kernels import latent_decode_attention_reference


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_paged_layout_is_the_same_attention(page_size, shuffle):
    B, H, T, Rc, Dr = 3, 4, 32, 16, 8
    g = torch.Generator().manual_seed(page_size)
    q_lat, q_pe = torch.randn(B, H, Rc, generator=g), torch.randn(B, H, Dr, generator=g)
    c_kv, k_pe = torch.randn(B, 1, T, Rc, generator=g), torch.randn(B, 1, T, Dr, generator=g)
    n = B * T // page_size
    perm = torch.randperm(n, generator=g) if shuffle else None
    lay = paged_layout(c_kv, k_pe, page_size, perm)

    assert lay["ckv"].shape == (n, page_size, Rc) and lay["kpe"].shape == (n, page_size, Dr)
    assert lay["qo_indptr"].tolist() == list(range(B + 1))
    assert lay["kv_indptr"].tolist() == [b * T // page_size for b in range(B + 1)]
    assert lay["kv_len"].tolist() == [T] * B
    assert all(lay[k].dtype == torch.int32 for k in ("qo_indptr", "kv_indptr", "kv_indices", "kv_len"))
    if not shuffle:
        assert lay["ckv"].data_ptr() == c_kv.data_ptr() and lay["kpe"].data_ptr() == k_pe.data_ptr()  # views
    # token t of row b sits at slot t % P of page kv_indices[kv_indptr[b] + t // P]
    b, t = 2, 21
    page = int(lay["kv_indices"][int(lay["kv_indptr"][b]) + t // page_size])
    assert torch.equal(lay["ckv"][page, t % page_size], c_kv[b, 0, t])
    assert torch.equal(lay["kpe"][page, t % page_size], k_pe[b, 0, t])

    scale = 1 / math.sqrt(24)
    ours = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, scale)
    paged = paged_reference(q_lat, q_pe, lay["ckv"], lay["kpe"], lay["kv_indptr"], lay["kv_indices"], lay["kv_len"], scale)
    torch.testing.assert_close(paged, ours, rtol=1e-5, atol=1e-5)


def test_paged_layout_rejects_what_flashinfer_cannot_hold():
    with pytest.raises(ValueError, match="one latent and one rope head"):
        paged_layout(torch.zeros(1, 3, 8, 16), torch.zeros(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="multiple of the page size"):
        paged_layout(torch.zeros(1, 1, 10, 16), torch.zeros(1, 1, 10, 8), 4)


def test_shapes_and_points():
    deepseek = {s.name: s for s in SHAPES}["deepseek/h128"]
    assert (deepseek.Rc, deepseek.Dr, deepseek.H) == (512, 64, 128)
    assert deepseek.scale == pytest.approx(1 / math.sqrt(192))
    assert parse_point("64x32768") == (64, 32768)
