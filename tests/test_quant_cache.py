"""Quantized latent cache: per-element error bound, residual window, bytes per token, config round trip, generate()."""

import copy
import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from mha2mla_core import LatentCache, MLAConfig, convert_to_mla, generate_static
from mha2mla_core.evaluation.perplexity import logits_through_cache, perplexity_of_ids
from mha2mla_core.kernels import (
    dequantize_group,
    latent_decode_attention_quantized,
    latent_decode_attention_reference,
    triton_available,
)
from mha2mla_core.modeling.latent_cache import KVCacheQuantConfig, QuantizedLatentCache, QuantizedLatentLayer, quantize_groups
from tests.tiny_models import calib_ids, tiny_model

B, H, Hkv, Hc, Rc, Dr = 2, 9, 3, 1, 48, 8  # SmolLM2-135M heads with a shared latent of 16 per KV head


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _latents(T: int, dtype=torch.float32, device="cpu"):
    """c_kv with SVD-like channel scales (1e0.5 .. 1e-1) and an offset, k_pe plain Gaussian."""
    scales = torch.logspace(0.5, -1, Rc, device=device)
    c_kv = (torch.randn(B, Hc, T, Rc, device=device) + 0.3 * torch.randn(Rc, device=device)) * scales
    return c_kv.to(dtype), torch.randn(B, Hkv, T, Dr, device=device, dtype=dtype)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nbits": 3}, "nbits=3"), ({"group_size": 40}, "group_size=40"), ({"residual_length": -1}, "residual_length=-1"),
     ({"backend": "gptq"}, "backend='gptq'")],
)  # fmt: skip
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCacheQuantConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown keys"):
        KVCacheQuantConfig.from_dict({"nbits": 4, "bits": 4})


# one quantization step is the group's scale; min-max rounding stays within half a step (plus fp16 storage of the
# scale and zero), HQQ's refined zero may clip the extremes of a group by up to another half step
STEP_BOUND = {"quanto": 0.52, "hqq": 1.0}


@pytest.mark.parametrize("backend", ["hqq", "quanto"])
@pytest.mark.parametrize("nbits", [4, 2])
def test_quantization_error_stays_under_its_bound(backend, nbits):
    c_kv, _ = _latents(256)
    q = quantize_groups(c_kv, KVCacheQuantConfig(nbits=nbits, group_size=64, backend=backend))
    assert q.codes.shape == (B, Hc, 256, Rc * nbits // 8) and q.scale.shape == (B, Hc, 4, Rc)
    error = (dequantize_group(q) - c_kv).abs()
    step = q.scale.float().repeat_interleave(64, dim=2)  # (B, Hc, T, Rc)
    assert (error / step).max() <= STEP_BOUND[backend]
    assert error.norm() / c_kv.norm() < {4: 0.1, 2: 0.5}[nbits]


def test_residual_window_is_exact_and_tokens_are_quantized_once():
    cfg = KVCacheQuantConfig(nbits=4, group_size=16, residual_length=32)
    layer = QuantizedLatentLayer(cfg)
    c_kv, k_pe = _latents(250)
    layer.append(c_kv[:, :, :150], k_pe[:, :, :150])  # prefill, then decode one token at a time
    for t in range(150, 250):
        before = layer.c_kv_codes.codes.clone()
        layer.append(c_kv[:, :, t : t + 1], k_pe[:, :, t : t + 1])
        tq, residual = layer.c_kv_codes.num_tokens, layer.keys.shape[2]
        assert tq % 16 == 0 and 32 <= residual < 32 + 16 and tq + residual == t + 1 == layer.get_seq_length()
        assert torch.equal(layer.c_kv_codes.codes[:, :, : before.shape[2]], before)  # old codes never change
        assert torch.equal(layer.keys, c_kv[:, :, tq : t + 1]) and torch.equal(layer.values, k_pe[:, :, tq : t + 1])
    c_all, k_all = layer.state().dequantize()
    assert c_all.shape == c_kv.shape and k_all.shape == k_pe.shape


@pytest.mark.parametrize("nbits", [4, 2])
def test_bytes_per_token_are_measured_from_codes_scales_zeros_and_residual(nbits):
    cache = QuantizedLatentCache(KVCacheQuantConfig(nbits=nbits, group_size=64, residual_length=128))
    c_kv, k_pe = _latents(1000, torch.bfloat16)
    for layer_idx in range(2):
        cache.update(c_kv, k_pe, layer_idx)
    tq, t_res = 832, 168  # (1000 - 128) // 64 * 64 quantized, the rest in bf16
    codes = (Rc + Hkv * Dr) * nbits // 8 * tq
    scales_zeros = 2 * 2 * (Rc + Hkv * Dr) * tq // 64  # fp16 scale and zero per channel and group
    residual = 2 * (Rc + Hkv * Dr) * t_res
    assert cache.kv_bytes_per_token() == 2 * (codes + scales_zeros + residual) / 1000
    # far from the residual window a token costs (Rc + Hkv*Dr) * (nbits/8 + 4/64) bytes per layer
    per_token = cache.layers[0].c_kv_codes.nbytes + cache.layers[0].k_pe_codes.nbytes
    assert per_token / (B * tq) == {4: 40.5, 2: 22.5}[nbits]  # vs 144 for the bf16 latent, 768 for SmolLM2's K/V


def test_decode_attention_through_the_cache_stays_close_to_unquantized():
    c_kv, k_pe = _latents(600)
    q_lat, q_pe = torch.randn(B, H, Rc) / torch.logspace(0.5, -1, Rc) * 0.2, torch.randn(B, H, Dr)
    exact = latent_decode_attention_reference(q_lat, q_pe, c_kv, k_pe, 1 / math.sqrt(64))
    for nbits, bound in ((4, 0.06), (2, 0.4)):
        cache = QuantizedLatentCache(KVCacheQuantConfig(nbits=nbits, group_size=64, residual_length=128))
        cache.append(c_kv, k_pe, 0)
        out = latent_decode_attention_quantized(q_lat, q_pe, cache.quantized_state(0), 1 / math.sqrt(64))
        assert (out - exact).norm() / exact.norm() < bound


@pytest.fixture(scope="module")
def mla():
    cfg = MLAConfig(rope_dims=4, kv_rank=8, svd="aware", layout="shared", calib_seq_len=64)
    return convert_to_mla(tiny_model("llama-gqa"), cfg, calib_ids())


def test_saved_model_reloads_with_the_same_quantized_cache(mla, tmp_path):
    quant = KVCacheQuantConfig(nbits=2, group_size=32, residual_length=64, backend="quanto")
    mla.config.kv_cache_quant = quant.to_dict()
    try:
        mla.save_pretrained(tmp_path)
    finally:
        mla.config.kv_cache_quant = None
    assert isinstance(mla.make_cache(), LatentCache) and not isinstance(mla.make_cache(), QuantizedLatentCache)
    cache = AutoModelForCausalLM.from_pretrained(tmp_path).make_cache()
    assert isinstance(cache, QuantizedLatentCache) and cache.quant_config == quant


def test_a_static_cache_says_it_keeps_full_precision_where_the_model_has_a_quantized_cache(mla, caplog):
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    with caplog.at_level(logging.WARNING, logger="mha2mla_core.modeling.modeling_mla"):
        plain = generate_static(mla, ids, 4)
    assert not caplog.records  # no quantized cache: nothing to say
    try:
        mla.config.kv_cache_quant = KVCacheQuantConfig(nbits=4).to_dict()
        with caplog.at_level(logging.WARNING, logger="mha2mla_core.modeling.modeling_mla"):
            static = generate_static(mla, ids, 4)
            generated = mla.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     cache_implementation="static")
    finally:
        mla.config.kv_cache_quant = None
    assert torch.equal(static, plain) and torch.equal(generated, plain)  # the latent in full precision, as it said
    assert [r.getMessage().count("4-bit cache (kv_cache_quant) applies to the dynamic cache only") for r in
            caplog.records] == [1, 1]


def test_generate_with_quantized_cache(mla):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    plain = mla.generate(ids, past_key_values=LatentCache(), **kwargs)
    window = QuantizedLatentCache(KVCacheQuantConfig(group_size=16, residual_length=64))  # everything in the window
    assert torch.equal(mla.generate(ids, past_key_values=window, **kwargs).sequences, plain.sequences)
    quantized = QuantizedLatentCache(KVCacheQuantConfig(nbits=4, group_size=16, residual_length=0))
    out = mla.generate(ids, past_key_values=quantized, **kwargs)
    assert quantized.layers[0].c_kv_codes.num_tokens == 32  # 47 cached tokens: two groups quantized, 15 in bf16
    first_plain, first_quant = plain.logits[0], out.logits[0]  # the first step attends to a quantized prompt
    assert (first_quant - first_plain).abs().max() < 0.1 * first_plain.abs().max()


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not triton_available(), reason="needs a CUDA GPU and Triton")])],
)  # fmt: skip
def test_decode_step_reads_the_codes_without_dequantizing_the_cache(mla, monkeypatch, device):
    dtype, tol = (torch.float32, 1e-4) if device == "cpu" else (torch.bfloat16, 3e-2)  # CUDA: the Triton int4 kernel
    model = copy.deepcopy(mla).to(device, dtype)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(6)).to(device)
    quantized = QuantizedLatentCache(KVCacheQuantConfig(nbits=4, group_size=16, residual_length=0))
    with torch.no_grad():
        model(ids, past_key_values=quantized, use_cache=True)
    dequantized = LatentCache()
    for i in range(model.config.num_hidden_layers):
        dequantized.update(*quantized.latents(i), i)  # the same cache contents, expanded once
    step = torch.tensor([[7], [9]], device=device)

    def no_update(*args, **kwargs):
        raise AssertionError("a decode step must not dequantize the whole cache")

    monkeypatch.setattr(QuantizedLatentLayer, "update", no_update)
    with torch.no_grad():
        fused = model(step, past_key_values=quantized, use_cache=True).logits
        reference = model(step, past_key_values=dequantized, use_cache=True).logits
    torch.testing.assert_close(fused.float(), reference.float(), atol=tol, rtol=tol)
    assert quantized.get_seq_length(0) == 41


@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_int4_decode_through_the_cache_matches_dequantized_reference(dtype):
    cache = QuantizedLatentCache(KVCacheQuantConfig(nbits=4, group_size=64, residual_length=128, backend="quanto"))
    c_kv, k_pe = _latents(3000, dtype, "cuda")
    cache.append(c_kv, k_pe, 0)
    q_lat, q_pe = torch.randn(B, H, Rc, device="cuda", dtype=dtype), torch.randn(B, H, Dr, device="cuda", dtype=dtype)
    fused = latent_decode_attention_quantized(q_lat, q_pe, cache.quantized_state(0), 0.125)
    ref = latent_decode_attention_reference(q_lat, q_pe, *cache.latents(0), 0.125)
    torch.testing.assert_close(fused, ref, atol=2e-2, rtol=2e-2)


def test_perplexity_of_a_quantized_cache_model_reads_the_codes(mla):
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(8))
    window = 48  # 5 blocks: four of 49 input tokens, then a shorter one
    plain, predicted, blocks = perplexity_of_ids(mla, ids, window)
    with torch.no_grad():  # the decode path a served model runs gives the one-forward logits
        inputs = ids[None, :49]
        torch.testing.assert_close(logits_through_cache(mla, inputs), mla(input_ids=inputs, use_cache=False).logits,
                                   atol=1e-4, rtol=1e-4)
    try:
        mla.config.kv_cache_quant = KVCacheQuantConfig(nbits=2, group_size=16, residual_length=window).to_dict()
        in_window = perplexity_of_ids(mla, ids, window)[0]  # every token stays in the bf16 window: nothing quantized
        mla.config.kv_cache_quant = KVCacheQuantConfig(nbits=2, group_size=16, residual_length=0).to_dict()
        int2 = perplexity_of_ids(mla, ids, window)
    finally:
        mla.config.kv_cache_quant = None
    assert in_window == pytest.approx(plain, rel=1e-6)
    assert int2[1:] == (predicted, blocks)
    assert 1e-6 * plain < abs(int2[0] - plain) < 0.01 * plain  # the codes were read (a random model barely cares)
