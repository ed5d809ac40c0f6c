"""Static-cache decoding: StaticLatentCache in generate(), and the CUDA-graph decoder, greedy and sampled (eager on CPU)."""

import copy

import pytest
import torch

from mha2mla_core import LatentCache, MLAConfig, convert_to_mla
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mha2mla_core.modeling.decoding import (
    GROUPED_DECODE,
    GROUPED_MIN_PAIRS,
    ONE_ROW_COMPILE_MODE,
    StaticDecoder,
    compile_mode_for,
    generate_static,
    grouped_decode_attention,
    grouped_view,
    next_tokens,
    prefill,
)
from mha2mla_core.kernels import latent_decode_attention_reference
from mha2mla_core.modeling.latent_cache import StaticLatentCache
from tests.tiny_models import calib_ids, tiny_model

GREEDY = dict(do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module", params=["per_head", "shared"])
def mla(request):
    cfg = MLAConfig(rope_dims=4, kv_rank=6, svd="aware", layout=request.param, calib_seq_len=64)
    return convert_to_mla(tiny_model("qwen2-bias"), cfg, calib_ids())


def test_fused_decode_step_equals_the_absorbed_one(mla):
    ids = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = mla(ids[:, :-1], use_cache=True).past_key_values
        other = copy.deepcopy(cache)
    with torch.no_grad():
        absorbed = mla(ids[:, -1:], past_key_values=cache, use_cache=True).logits  # (B, 1, V)
        weights = [layer.self_attn.fused_decode_weights() for layer in mla.model.layers]
        fused = mla(ids[:, -1:], past_key_values=other, use_cache=True, mla_decode_weights=weights).logits
    torch.testing.assert_close(fused, absorbed, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(other.layers[0].keys, cache.layers[0].keys)  # the same latent stored


def _left_padded_batch():
    short = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    long = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])  # (2, 9)
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()  # (2, 9)
    return batch, mask


def test_generate_with_a_static_cache_equals_the_dynamic_cache(mla):
    batch, mask = _left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, **GREEDY)
    dynamic = mla.generate(batch, **kw)
    static = mla.generate(batch, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic)


def test_static_cache_holds_the_same_bytes_per_token_as_the_latent_cache(mla):
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    static, dynamic = StaticLatentCache(mla.config.num_hidden_layers, 16), LatentCache()
    with torch.no_grad():
        a = mla(ids, past_key_values=static, use_cache=True).logits
        b = mla(ids, past_key_values=dynamic, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert static.kv_bytes_per_token() == dynamic.kv_bytes_per_token()
    assert static.layers[0].keys.shape[2] == 16 and int(static.layers[0].cumulative_length) == 6


@pytest.mark.parametrize("source", ["original", "mla"])
def test_greedy_decoder_equals_generate_with_left_padding(mla, source):
    model = tiny_model("qwen2-bias") if source == "original" else mla
    batch, mask = _left_padded_batch()
    expected = model.generate(batch, attention_mask=mask, max_new_tokens=9, min_new_tokens=9, **GREEDY)
    assert torch.equal(generate_static(model, batch, 9, attention_mask=mask, cuda_graph=False), expected)


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_grouped_decode_attention_equals_transformers_sdpa(mask_kind):
    g = torch.Generator().manual_seed(12)
    q = torch.randn(3, 9, 1, 16, generator=g)  # (B, H, 1, D)
    k, v = torch.randn(3, 3, 20, 16, generator=g), torch.randn(3, 3, 20, 16, generator=g)  # (B, Hkv, T, D)
    keep = torch.rand(3, 1, 1, 20, generator=g) > 0.3
    keep[..., 0] = True
    mask = {"bool": keep, "additive": torch.zeros(3, 1, 1, 20).masked_fill(~keep, float("-inf")), "none": None}[mask_kind]
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    grouped, _ = grouped_decode_attention(module, q, k, v, mask, scaling=0.25)
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)


def test_original_gqa_model_decodes_grouped_with_the_same_tokens():
    model = tiny_model("llama-gqa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    batch, mask = _left_padded_batch()
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[1].shape[2])  # query length
        return grouped_decode_attention(*args, **kwargs)

    AttentionInterface.register(GROUPED_DECODE, spy)
    try:
        grouped = generate_static(model, batch, 9, attention_mask=mask, cuda_graph=False, grouped=True)
    finally:
        AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    expected = model.generate(batch, attention_mask=mask, max_new_tokens=9, min_new_tokens=9, **GREEDY)
    assert torch.equal(grouped, expected)
    assert seen and set(seen) == {1}  # every decode step of every layer went through it, the prompt did not
    assert model.config._attn_implementation == "sdpa"  # restored


def test_grouped_decoding_never_switches_the_callers_model():
    model = tiny_model("llama-gqa")
    batch, mask = _left_padded_batch()
    seen = []

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)  # what another thread running the model meanwhile would get
        return grouped_decode_attention(*args, **kwargs)

    AttentionInterface.register(GROUPED_DECODE, spy)
    try:
        generate_static(model, batch, 4, attention_mask=mask, cuda_graph=False, grouped=True)
    finally:
        AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)
    assert seen and set(seen) == {"sdpa"}
    view = grouped_view(model)
    assert view.config._attn_implementation == GROUPED_DECODE and view.config is not model.config
    assert view.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight


def test_decoder_groups_from_grouped_min_pairs_rows_x_kv_heads():
    model = tiny_model("llama-gqa")
    fewest = -(-GROUPED_MIN_PAIRS // model.config.num_key_value_heads)  # rows from which grouped decoding pays
    for rows, expected in ((1, False), (fewest - 1, False), (fewest, True)):
        state = prefill(model, torch.randint(0, model.config.vocab_size, (rows, 3)), 2)
        assert StaticDecoder(model, state, cuda_graph=False).grouped is expected
    assert StaticDecoder(model, state, cuda_graph=False, grouped=False).grouped is False


def test_grouped_view_leaves_mla_and_non_sdpa_models_alone(mla):
    eager = tiny_model("llama-gqa", attn_implementation="eager")
    for model, expected in ((mla, mla.config._attn_implementation), (eager, "eager")):
        assert grouped_view(model) is model
        assert model.config._attn_implementation == expected


def test_decoder_runs_in_chunks_and_refuses_to_overrun_its_cache(mla):
    ids = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(7))
    decoder = StaticDecoder(mla, prefill(mla, ids, 6), cuda_graph=False)
    first = decoder.run(2).clone()  # (1, 3): the prefill's token and two decoded
    assert torch.equal(decoder.run(3)[:, :3], first)
    with pytest.raises(ValueError, match="room for 0 more tokens"):
        decoder.run(1)


def test_sampled_tokens_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]]).expand(40_000, 5)  # (B, V): one distribution, many draws
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        counts = torch.bincount(next_tokens(logits, temperature).squeeze(1), minlength=5) / 40_000
        torch.testing.assert_close(counts, torch.softmax(logits[0] / temperature, -1), atol=0.01, rtol=0)
    assert torch.equal(next_tokens(logits[:2], 0.0), torch.zeros(2, 1, dtype=torch.long))  # greedy


def test_sampled_decoding_is_seeded(mla):
    ids = torch.randint(3, 128, (3, 4), generator=torch.Generator().manual_seed(10))

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return generate_static(mla, ids, 12, cuda_graph=False, temperature=1.0)

    a = sample(1)
    assert a.shape == (3, 16) and torch.equal(a[:, :4], ids) and torch.equal(a, sample(1))
    assert not torch.equal(a, sample(2))
    assert not torch.equal(a, generate_static(mla, ids, 12, cuda_graph=False))  # not greedy
    with pytest.raises(ValueError, match="temperature=-1"):
        generate_static(mla, ids, 2, temperature=-1)


def test_reference_decode_ignores_slots_past_kv_end():
    g = torch.Generator().manual_seed(8)
    q_lat, q_pe = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 2, generator=g)
    c_kv, k_pe = torch.randn(2, 1, 12, 6, generator=g), torch.randn(2, 2, 12, 2, generator=g)
    end = torch.tensor([7])
    garbage = c_kv.clone()
    garbage[:, :, 7:] = 1e4  # unwritten slots of a static cache
    full = latent_decode_attention_reference(q_lat, q_pe, garbage, k_pe, 0.3, kv_end=end)
    sliced = latent_decode_attention_reference(q_lat, q_pe, c_kv[:, :, :7], k_pe[:, :, :7], 0.3)
    torch.testing.assert_close(full, sliced)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("source", ["original", "mla"])
@pytest.mark.parametrize("rows", [1, 2, 16])  # 1: the autotuned compile (ONE_ROW_COMPILE_MODE); 16: enough rows for
@pytest.mark.parametrize("compiled", [False, True])  # the original's grouped decoding (the split kernel)
def test_cuda_graph_replay_equals_eager_decoding(mla, source, rows, compiled):
    model = (tiny_model("qwen2-bias") if source == "original" else copy.deepcopy(mla)).cuda()
    batch, mask = _left_padded_batch()
    if rows == 1:  # the unpadded row
        batch, mask = batch[1:], mask[1:]
    batch, mask = (t.cuda().repeat(max(1, rows // 2), 1) for t in (batch, mask))
    eager = generate_static(model, batch, 12, attention_mask=mask, cuda_graph=False)
    replayed = generate_static(model, batch, 12, attention_mask=mask, cuda_graph=True, compiled=compiled)
    assert torch.equal(replayed, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_sampling_is_seeded_and_rows_of_one_prompt_diverge(mla):
    model = copy.deepcopy(mla).cuda()
    ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(11)).cuda().expand(64, 4)

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return generate_static(model, ids, 24, cuda_graph=True, temperature=1.0)[:, 4:]

    a = sample(3)
    assert torch.equal(a, sample(3)) and not torch.equal(a, sample(4))
    assert len({tuple(r) for r in a.tolist()}) > 32  # each row draws its own noise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("end", [1, 700, 4096])
def test_triton_decode_reads_only_up_to_kv_end(end):
    from mha2mla_core.kernels import latent_decode_attention

    g = torch.Generator(device="cuda").manual_seed(9)
    q_lat, q_pe = (torch.randn(2, 9, d, generator=g, device="cuda", dtype=torch.bfloat16) for d in (48, 8))
    c_kv = torch.randn(2, 1, 4096, 48, generator=g, device="cuda", dtype=torch.bfloat16)  # split over T
    k_pe = torch.randn(2, 3, 4096, 8, generator=g, device="cuda", dtype=torch.bfloat16)
    start = torch.tensor([0, min(5, end - 1)], device="cuda", dtype=torch.int32)
    garbage = c_kv.clone()
    garbage[:, :, end:] = 100.0
    fused = latent_decode_attention(q_lat, q_pe, garbage, k_pe, 0.125, start, torch.tensor([end], device="cuda"))
    expected = latent_decode_attention_reference(q_lat, q_pe, c_kv[:, :, :end], k_pe[:, :, :end], 0.125, start)
    torch.testing.assert_close(fused.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_generate_never_compiles_the_mla_model_on_its_own(mla):
    from transformers import CompileConfig, GenerationConfig, StaticCache

    config = GenerationConfig(compile_config=CompileConfig())
    config.compile_config._compile_all_devices = True  # what would make transformers compile on this CPU
    original = tiny_model("qwen2-bias")
    static = StaticCache(config=original.config, max_cache_len=8)
    assert original._valid_auto_compile_criteria({"past_key_values": static}, config)  # the original would compile
    latent = StaticLatentCache(mla.config.num_hidden_layers, 8)
    assert not mla._valid_auto_compile_criteria({"past_key_values": latent}, config)


def test_compile_mode_autotunes_one_row_on_a_gpu_only():
    assert compile_mode_for(1, on_cuda=True) == ONE_ROW_COMPILE_MODE == "max-autotune-no-cudagraphs"
    assert compile_mode_for(2, on_cuda=True) == compile_mode_for(1, on_cuda=False) == "default"
    assert compile_mode_for(1, on_cuda=True, mode="default") == "default"
    model = tiny_model()
    state = prefill(model, torch.tensor([[5, 6, 7]]), 4)
    with pytest.raises(ValueError, match="needs compiled=True"):
        StaticDecoder(model, state, cuda_graph=False, compile_mode="default")
