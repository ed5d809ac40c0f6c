"""Offline tokenizer, 10-item MC data and a haystack for the evaluation tests (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tiny_models import tiny_model

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0, 1, 2 match tiny_models.COMMON
HAYSTACK = (
    "The river ran past the old mill and the children watched the boats go by . "
    "A cold wind came over the hills and the farmer closed the gate . "
    "In the evening the lamps were lit and the town grew quiet . "
    "She wrote a long letter to her brother about the harvest and the weather . "
)
ARC_ITEMS = [  # (question, choices, gold)
    ("Which season is coldest?", ["winter", "summer", "spring", "autumn"], 0),
    ("What do plants need to make food?", ["sunlight", "sand", "noise", "plastic"], 0),
    ("Which is a liquid at room temperature?", ["iron", "water", "wood", "salt"], 1),
    ("What gives off light at night in the sky?", ["the moon", "a rock", "a tree", "the soil"], 0),
    ("Which animal lives in water?", ["fish", "horse", "cow", "dog"], 0),
    ("What do we breathe in?", ["oxygen", "gold", "paper", "glass"], 0),
    ("Which object is the heaviest?", ["a car", "a feather", "a leaf", "a coin"], 0),
    ("What melts ice?", ["heat", "cold", "dark", "wind"], 0),
    ("Which tool measures temperature?", ["ruler", "thermometer", "scale", "clock"], 1),
    ("What is the closest star to Earth?", ["the sun", "the moon", "Mars", "a comet"], 0),
]
NEEDLE_TEMPLATES = dict(
    intro="", needle="the magic number is {passkey} .", question="what is the magic number ? the magic number is"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (digits split one by one) over every word the evaluation tests use."""
    corpus = [HAYSTACK, *NEEDLE_TEMPLATES.values(), "0123456789 Question: Answer: ? ."]
    corpus += [f"{q} {' '.join(c)}" for q, c, _ in ARC_ITEMS]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def tiny_lm(tokenizer: PreTrainedTokenizerFast, name: str = "llama-gqa", seed: int = 0):
    """A tiny seeded random Llama whose vocabulary fits `tokenizer`."""
    return tiny_model(name, seed=seed, vocab_size=len(tokenizer))


def write_arc_items(directory: Path) -> Path:
    """ARC_ITEMS as `<directory>/arc_easy.jsonl` in the shared/data/mc schema."""
    path = directory / "arc_easy.jsonl"
    rows = [
        {"id": f"arc_easy-test-{i:05d}", "task": "arc_easy", "split": "test", "question": q, "choices": c, "label": g}
        for i, (q, c, g) in enumerate(ARC_ITEMS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
