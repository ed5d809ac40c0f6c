"""Inference cost: KV bytes/token from the cache's own tensors (standard and latent caches), the speed grid."""

import pytest
import torch

from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.evaluation.inference import (
    InferenceConfig,
    cache_bytes_per_token,
    reported_kv_bytes_per_token,
    run_inference,
)
from tiny_models import calib_ids, tiny_model

LAYERS, KV_HEADS, HEAD_DIM, FP32 = 2, 2, 16, 4


def cache_after_forward(model, batch: int, tokens: int):
    ids = torch.randint(3, 128, (batch, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True).past_key_values


def test_standard_cache_holds_keys_and_values_of_every_kv_head():
    cache = cache_after_forward(tiny_model("llama-gqa"), batch=3, tokens=10)
    assert cache_bytes_per_token(cache, 3, 10) == LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32
    assert reported_kv_bytes_per_token(tiny_model("llama-gqa")) is None


@pytest.mark.parametrize("layout", ["per_head", "shared"])
def test_latent_cache_bytes_match_the_model_report_and_the_config(layout):
    mla = convert_to_mla(tiny_model("llama-gqa"), MLAConfig(rope_dims=4, kv_rank=8, layout=layout), calib_ids())
    measured = cache_bytes_per_token(cache_after_forward(mla, batch=2, tokens=7), 2, 7)
    assert measured == LAYERS * KV_HEADS * (8 + 4) * FP32  # latent R + kept rope dims Dr per KV head
    assert measured == reported_kv_bytes_per_token(mla)


def test_empty_cache_is_refused():
    with pytest.raises(ValueError, match="holds no tensors"):
        cache_bytes_per_token(torch.nn.Module(), 1, 1)


@pytest.mark.parametrize("source", ["original", "mla"])
def test_speed_grid_covers_every_point(source):
    model = tiny_model("llama-gqa")
    if source == "mla":
        model = convert_to_mla(model, MLAConfig(rope_dims=4, kv_rank=8), calib_ids())
    cfg = InferenceConfig(contexts=(16, 64), batch_sizes=(1, 2), decode_steps=4, repeats=2)
    points = run_inference(model, cfg)
    assert [(p.batch, p.context) for p in points] == [(1, 16), (2, 16), (1, 64), (2, 64)]
    assert len({p.kv_bytes_per_token for p in points}) == 1
    for p in points:
        assert p.prefill_tok_s > 0 and p.decode_tok_s > 0 and p.generate_tok_s > 0
        assert p.memory_kind == "rss_delta" and p.peak_memory_bytes >= 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(contexts=()), "contexts="),
        (dict(batch_sizes=(0,)), "batch_sizes="),
        (dict(decode_steps=0), "decode_steps=0"),
        (dict(repeats=0), "repeats=0"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InferenceConfig(**kwargs)


def test_context_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        run_inference(tiny_model(), InferenceConfig(contexts=(500,), decode_steps=32))


def test_best_of_keeps_the_fastest_speeds_and_the_largest_memory():
    from mha2mla_core.evaluation.inference import InferencePoint, best_of

    slow = InferencePoint(1, 8, 10.0, 5.0, 4.0, 64.0, 100, "rss_delta")
    fast = InferencePoint(1, 8, 20.0, 3.0, 6.0, 64.0, 50, "rss_delta")
    assert best_of([slow, fast]) == InferencePoint(1, 8, 20.0, 5.0, 6.0, 64.0, 100, "rss_delta")
