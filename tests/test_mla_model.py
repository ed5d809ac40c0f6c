"""The converted model: latent cache contents, absorbed decode, generate(), save/load."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from mha2mla_core import LatentCache, MLAConfig, convert_to_mla, load_model
from tests.tiny_models import calib_ids, tiny_model

HEAD_DIM = 16


@pytest.fixture(scope="module", params=["per_head", "shared"])
def mla(request):
    # per-KV-head 2-norm pairs with either latent layout (the shared RoPE key has tests/test_rotated_rope.py)
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=4, kv_rank=6, svd="aware", layout=request.param, calib_seq_len=64)
    return convert_to_mla(tiny_model("qwen2-bias"), cfg, calib_ids())


def test_cache_holds_only_latents_and_rope_dims(mla):
    ids = torch.randint(3, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    cache = mla(ids, use_cache=True).past_key_values
    assert isinstance(cache, LatentCache)
    hkv = 2
    groups = 2 if mla.config.mla_conversion["layout"] == "per_head" else 1
    for layer in range(2):
        c_kv, k_pe = cache.latents(layer)
        assert c_kv.shape == (3, groups, 11, 6 * hkv // groups)  # kv_rank per KV head
        assert k_pe.shape == (3, hkv, 11, 4)  # rope_dims per KV head
    per_token_values = 2 * hkv * (6 + 4)  # layers x KV heads x (kv_rank + rope_dims)
    assert cache.kv_bytes_per_token() == per_token_values * 4
    assert mla.kv_bytes_per_token() == per_token_values * 4
    original = 2 * 2 * hkv * HEAD_DIM * 4
    assert mla.kv_bytes_per_token() / original == pytest.approx(20 / 64)


def _decode_steps(model, ids, steps):
    """Greedy step-by-step decoding with the cache; returns the stacked logits of every step."""
    out = model(ids, use_cache=True)
    cache, logits = out.past_key_values, [out.logits[:, -1]]
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        token = out.logits[:, -1:].argmax(-1)
    return torch.stack(logits, 1)


def test_absorbed_decode_equals_expanded_attention_over_20_steps(mla):
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mla.config.mla_decode = "absorbed"
    absorbed = _decode_steps(mla, ids, 20)
    mla.config.mla_decode = "expanded"
    expanded = _decode_steps(mla, ids, 20)
    mla.config.mla_decode = "absorbed"
    torch.testing.assert_close(absorbed, expanded, atol=1e-4, rtol=0)
    # and both equal a full forward over the same greedy tokens without any cache
    tokens = torch.cat([ids, absorbed[:, :-1].argmax(-1)], dim=1)
    full = mla(tokens, use_cache=False).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(absorbed, full, atol=1e-4, rtol=0)


def test_generate_equals_step_by_step_greedy(mla):
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    generated = mla.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    reference = torch.cat([ids, _decode_steps(mla, ids, 11).argmax(-1)], dim=1)
    assert torch.equal(generated, reference)


def test_batched_generate_with_left_padding_matches_single_sequences(mla):
    short = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    long = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1), torch.ones(1, 9)]).long()
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    together = mla.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 4:], mla.generate(short, **kw)[0])
    assert torch.equal(together[1], mla.generate(long, **kw)[0])


def test_sampling_generate_is_seeded_and_in_vocab(mla):
    ids = torch.randint(3, 128, (2, 4), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    a = mla.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(0)
    b = mla.generate(ids, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] > 4 and int(a.max()) < 128


def test_save_and_load_in_a_fresh_process_gives_identical_logits(mla, tmp_path):
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    mla.save_pretrained(tmp_path / "ckpt")
    torch.save(mla(ids).logits, tmp_path / "expected.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, mha2mla_core
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(r"{tmp_path / 'ckpt'}", local_files_only=True)
        assert type(model).__name__ == "MLAForCausalLM", type(model)
        ids = torch.load(r"{tmp_path / 'ids.pt'}", weights_only=True)
        expected = torch.load(r"{tmp_path / 'expected.pt'}", weights_only=True)
        assert torch.equal(model(ids).logits, expected), (model(ids).logits - expected).abs().max()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr[-2000:]


def test_load_model_reads_a_saved_mla_checkpoint(mla, tmp_path):
    mla.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.rope_pairs == mla.config.rope_pairs
    with pytest.raises(FileNotFoundError, match="has a model but no tokenizer.*tokenizer.save_pretrained"):
        load_model(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(str(empty))


def test_checkpoint_missing_its_mla_config_is_rejected(mla, tmp_path):
    mla.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(config.replace('"mla_llama"', '"llama"'))
    with pytest.raises(ValueError, match="holds MLA weights but config.json has model_type='llama'"):
        load_model(str(tmp_path))
