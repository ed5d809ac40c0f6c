"""Rotated partial RoPE: one RoPE key shared by every query head, made of per-frequency mixes of the KV heads.

Exact at full budget (MHA, GQA, with biases), optimal in captured energy against unrotated pairs, and a model whose
cache, decode paths and checkpoint work like the per-head layout's (tiny seeded models, CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mha2mla_core import LatentCache, MLAConfig, convert_to_mla, convert_to_mla_with_report
from mha2mla_core.conversion.convert import query_key_states, stream_layers, calibration_batches
from mha2mla_core.modeling.decoding import generate_static
from mha2mla_core.kernels import latent_decode_attention, latent_decode_attention_reference
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig, QuantizedLatentCache
from mha2mla_core.conversion.rope import pair_norms, rotate_rope, rotation_loss, score_rope_pairs, select_rope_pairs
from tests.tiny_models import calib_ids, tiny_model

HEAD_DIM = 16


def _layer_states(name: str, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    model, states = tiny_model(name), {}

    def visit(i, attn, x_in):
        if i == layer:
            states["qk"] = query_key_states(attn, x_in, HEAD_DIM)

    stream_layers(model, calibration_batches(calib_ids(), 64), visit)
    return states["qk"]


@pytest.mark.parametrize("source", ["llama-mha", "llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("kv_rank", [None, 8])
def test_full_budget_rotated_rope_reproduces_the_original_logits(source, kv_rank):
    """Every (frequency, component) slot kept: the rotation alone changes nothing (fp32 < 1e-4)."""
    model = tiny_model(source)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    reference = model(ids).logits
    hkv = model.config.num_key_value_heads
    rank = None if kv_rank is None else 64 // hkv  # Rc = hidden: the latent spans every row the layer can make
    cfg = MLAConfig(rope_dims=HEAD_DIM, rope_window=64, kv_rank=rank, svd="output-aware", calib_seq_len=64)
    mla = convert_to_mla(model, cfg, calib_ids())
    assert mla.config.shared_rope and mla.config.qk_rope_head_dim == HEAD_DIM * hkv
    torch.testing.assert_close(mla(ids).logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["llama-mha", "llama-gqa"])
def test_mixes_invert_per_frequency_and_kept_slots_hold_the_top_energy(source):
    q, k = _layer_states(source)
    hkv = k.shape[1]
    full = rotate_rope(q, k, keep=hkv * HEAD_DIM // 2)
    for f in range(HEAD_DIM // 2):
        at = full.pairs == f
        torch.testing.assert_close(full.query_mix[at].T @ full.key_mix[at], torch.eye(hkv, dtype=torch.float64))
    part = rotate_rope(q, k, keep=5)
    kept = part.energy[part.pairs, 0]  # noqa: the first component of a kept frequency is always kept first
    dropped = part.energy.flatten().sort(descending=True).values[5:]
    assert kept.min() >= dropped.max()
    assert part.key_mix.shape == (5, hkv) and torch.all(part.pairs[1:] >= part.pairs[:-1])


@pytest.mark.parametrize("source", ["llama-mha", "llama-gqa"])
def test_rotation_captures_at_least_the_energy_of_unrotated_pairs(source):
    """Per frequency the kept components are the top eigenvectors, so they carry at least as much query-weighted key
    energy as keeping the same number of the heads' own pairs (Ky Fan); 2-norm is one such unrotated choice."""
    q, k = _layer_states(source)
    hkv, keep = k.shape[1], 2 * k.shape[1]
    rotated = rotate_rope(q, k, keep)
    q_energy = pair_norms(q).square().view(q.shape[0], hkv, -1, HEAD_DIM // 2).sum(2).mean(0).double()  # (Hkv, D/2)
    k_energy = pair_norms(k).square().mean(0).double()  # (Hkv, D/2)
    pairs = select_rope_pairs("2-norm", keep // hkv * 2, HEAD_DIM, score_rope_pairs(q, k))  # (Hkv, P)
    unrotated = (q_energy * k_energy).gather(1, pairs).sum()
    captured = rotated.energy.flatten().topk(keep).values.sum()
    assert captured >= unrotated * (1 - 1e-9)


@pytest.fixture(scope="module")
def mla():
    cfg = MLAConfig(rope_strategy="rotated", rope_dims=4, kv_rank=6, svd="output-aware", calib_seq_len=64)
    return convert_to_mla(tiny_model("qwen2-bias"), cfg, calib_ids())


def test_cache_holds_one_shared_rope_key_and_the_latent(mla):
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    cache = mla(ids, use_cache=True).past_key_values
    assert isinstance(cache, LatentCache)
    for layer in range(2):
        c_kv, k_pe = cache.latents(layer)
        assert c_kv.shape == (3, 1, 11, 12) and k_pe.shape == (3, 1, 11, 8)
    assert mla.kv_bytes_per_token() == 2 * 2 * (6 + 4) * 4  # same budget as per-head pairs: Hkv * (kv_rank + rope_dims)


def test_absorbed_decode_equals_expanded_and_a_full_forward(mla):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    steps = {}
    for mode in ("absorbed", "expanded"):
        mla.config.mla_decode = mode
        out = mla(ids, use_cache=True)
        cache, logits, token = out.past_key_values, [out.logits[:, -1]], out.logits[:, -1:].argmax(-1)
        for _ in range(12):
            out = mla(token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
        steps[mode] = torch.stack(logits, 1)
    mla.config.mla_decode = "absorbed"
    torch.testing.assert_close(steps["absorbed"], steps["expanded"], atol=1e-4, rtol=0)
    tokens = torch.cat([ids, steps["absorbed"][:, :-1].argmax(-1)], dim=1)
    torch.testing.assert_close(steps["absorbed"], mla(tokens).logits[:, ids.shape[1] - 1 :], atol=1e-4, rtol=0)


def test_static_quantized_and_graph_decoders_agree_with_generate(mla):
    short = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    long = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    dynamic = mla.generate(batch, **kw)
    assert torch.equal(mla.generate(batch, cache_implementation="static", **kw), dynamic)
    assert torch.equal(generate_static(mla, batch, 10, attention_mask=mask, cuda_graph=False), dynamic)
    window = QuantizedLatentCache(KVCacheQuantConfig(group_size=16, residual_length=64))  # all in full precision
    assert torch.equal(mla.generate(batch, past_key_values=window, **kw), dynamic)


def test_decode_kernel_contract_reads_one_rope_key_for_all_heads():
    g = torch.Generator().manual_seed(0)
    q_lat, q_pe = torch.randn(2, 6, 12, generator=g), torch.randn(2, 6, 8, generator=g)
    c_kv, k_pe = torch.randn(2, 1, 30, 12, generator=g), torch.randn(2, 1, 30, 8, generator=g)
    out = latent_decode_attention(q_lat, q_pe, c_kv, k_pe, 0.25)
    scores = (torch.einsum("bhr,btr->bht", q_lat, c_kv[:, 0]) + torch.einsum("bhd,btd->bht", q_pe, k_pe[:, 0])) * 0.25
    expected = torch.einsum("bht,btr->bhr", scores.softmax(-1), c_kv[:, 0])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 0.25), expected)


def test_save_and_reload_keeps_the_shared_key(mla, tmp_path):
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    mla.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.shared_rope and reloaded.config.rope_pairs == mla.config.rope_pairs
    assert torch.equal(reloaded(ids).logits, mla(ids).logits)


def test_default_conversion_keeps_the_fastest_frequencies_in_every_layer():
    """The default (shared latent) is rotated RoPE with ordinary frequencies: DeepSeek's exportable layout."""
    cfg = MLAConfig(rope_dims=4, kv_rank=6, calib_seq_len=64)
    assert (cfg.rope_strategy, cfg.rope_window) == ("rotated", None)
    assert MLAConfig(layout="per_head").rope_strategy == "2-norm"
    mla = convert_to_mla(tiny_model("llama-gqa"), cfg, calib_ids())
    assert mla.config.rope_pairs == [[[0, 1, 2, 3]]] * 2
    with pytest.raises(ValueError, match=r"keeps the rope_dims \* Hkv / 2 = 16 fastest frequencies.*use rope_dims <= 8"):
        convert_to_mla(tiny_model("llama-gqa"), MLAConfig(rope_dims=16, calib_seq_len=64), calib_ids())


def test_report_holds_component_energies_and_config_errors_are_early():
    cfg = MLAConfig(rope_strategy="rotated", rope_dims=4, kv_rank=6, calib_seq_len=64)
    _, report = convert_to_mla_with_report(tiny_model("llama-gqa"), cfg, calib_ids())
    assert report.rope_scores.shape == (2, 2, HEAD_DIM // 2) and len(report.rope_pairs[0]) == 1
    with pytest.raises(ValueError, match="rotated.*needs the shared latent.*layout='shared'"):
        MLAConfig(rope_strategy="rotated", layout="per_head")


def test_rotation_loss_is_what_losing_the_rotation_costs_over_the_window():
    inv_freq = torch.tensor([1.0, 1e-2, 1e-5], dtype=torch.float64)
    loss = rotation_loss(inv_freq, 256)
    dist = torch.arange(256, dtype=torch.float64)
    brute = torch.stack([sum((256 - t) * 2 * (1 - torch.cos(w * t)) for t in dist) / (256 * 257 / 2) for w in inv_freq])
    torch.testing.assert_close(loss, brute)
    assert loss[0] > 1.5 and loss[2] < 1e-5  # a fast pair loses almost everything, a slow one almost nothing


def test_rope_window_keeps_the_frequencies_whose_rotation_matters_over_the_window():
    q, k = _layer_states("llama-gqa")
    inv_freq = tiny_model("llama-gqa").model.rotary_emb.inv_freq
    by_energy = rotate_rope(q, k, keep=4)
    by_position = rotate_rope(q, k, keep=4, position_loss=rotation_loss(inv_freq, 64))
    loss = rotation_loss(inv_freq, 64)
    assert loss[by_position.pairs].sum() >= loss[by_energy.pairs].sum()
    model = tiny_model("llama-gqa")
    cfg = MLAConfig(rope_strategy="rotated", rope_dims=4, kv_rank=6, rope_window=64, calib_seq_len=64)
    assert convert_to_mla(model, cfg, calib_ids()).config.rope_pairs[0] == [by_position.pairs.tolist()]
    with pytest.raises(ValueError, match="rope_window=64 applies to rope_strategy='rotated' only"):
        MLAConfig(rope_strategy="2-norm", rope_window=64)
