"""Needle-in-a-haystack retrieval: a passkey sentence hidden in real text, recalled with greedy `generate()`.

Each case is a prompt of exactly `length` tokens: intro, haystack tokens (a seeded random slice of the haystack
text), the needle sentence with a random passkey inserted at the sentence boundary nearest to `depth` (0 = right
after the intro, 1 = right before the question), then the question. Pieces are tokenized separately and joined
as ids. The model answers through its normal `generate()` (for MLA models: latent cache + absorbed decode); a
case is correct when the first number in the decoded answer equals the passkey.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mha2mla_core.evaluation.paths import PACKAGED_BOOKS, check_fits_context, read_text

logger = logging.getLogger(__name__)

SENTENCE_ENDS = (".", "!", "?")
HAYSTACK_CHARS_PER_TOKEN = 16  # characters of haystack text tokenized per prompt token needed (room for offsets)


@dataclass(frozen=True)
class NeedleConfig:
    """The grid (lengths x depths, `trials` passkeys per cell) and the prompt pieces."""

    haystack_paths: tuple[Path, ...] = ()  # () = the package's books (mha2mla_core/resources)
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)  # prompt tokens
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 2
    passkey_digits: int = 5
    max_new_tokens: int = 8
    batch_size: int = 1  # prompts of one length per generate() call
    seed: int = 0
    intro: str = "There is a special magic number hidden inside the text below. Remember it.\n\n"
    needle: str = " The special magic number is {passkey}."
    question: str = "\n\nWhat is the special magic number? The special magic number is"

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths={self.lengths} must be a non-empty list of positive token counts")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths={self.depths} must be a non-empty list of fractions in [0, 1]")
        for name in ("trials", "passkey_digits", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if "{passkey}" not in self.needle:
            raise ValueError(f"needle={self.needle!r} must contain the placeholder {{passkey}}")


@dataclass(frozen=True)
class NeedleCase:
    length: int
    depth: float
    trial: int
    passkey: str
    input_ids: tuple[int, ...]
    needle_at: int  # index of the needle's first token in input_ids


@dataclass(frozen=True)
class NeedleTrial:
    length: int
    depth: float
    trial: int
    passkey: str
    answer: str
    correct: bool


@dataclass(frozen=True)
class NeedleResult:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    accuracy: tuple[tuple[float, ...], ...]  # accuracy[i][j]: lengths[i], depths[j]
    trials: tuple[NeedleTrial, ...]

    @property
    def mean_accuracy(self) -> float:
        return sum(c.correct for c in self.trials) / len(self.trials)


def haystack_files(paths: tuple[Path, ...]) -> list[Path]:
    """The given files, or the package's own public-domain books when none are given."""
    return [Path(p) for p in paths] if paths else list(PACKAGED_BOOKS)


def load_haystack(paths: tuple[Path, ...]) -> str:
    fix = "pass existing text files as NeedleConfig(haystack_paths=...)"
    return "\n\n".join(read_text(p, "haystack text", fix) for p in haystack_files(paths))


class NeedlePrompts:
    """Builds the prompt of each (length, depth, trial) from one tokenized haystack."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: NeedleConfig, haystack: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.intro = tokenizer(cfg.intro)["input_ids"]  # with the tokenizer's default BOS, if any
        self.question = self._ids(cfg.question)
        chars = HAYSTACK_CHARS_PER_TOKEN * max(cfg.lengths)
        self.hay = self._ids(haystack[:chars])
        self.sentence_ends = {i for i in set(self.hay) if tokenizer.decode([i]).rstrip().endswith(SENTENCE_ENDS)}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def case(self, length: int, depth: float, trial: int) -> NeedleCase:
        rng = random.Random(f"{self.cfg.seed}:{length}:{depth}:{trial}")
        digits = self.cfg.passkey_digits
        passkey = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))
        needle = self._ids(self.cfg.needle.format(passkey=passkey))
        budget = length - len(self.intro) - len(needle) - len(self.question)
        if budget < 0:
            raise ValueError(
                f"length={length} tokens cannot hold the intro, needle and question "
                f"({length - budget} tokens); use lengths >= {length - budget}"
            )
        if budget > len(self.hay):
            raise ValueError(
                f"length={length} needs {budget} haystack tokens but the haystack text gives {len(self.hay)}; "
                "pass a longer text as haystack_paths or use shorter lengths"
            )
        start = rng.randrange(len(self.hay) - budget + 1)
        hay = self.hay[start : start + budget]
        at = self._insertion_point(hay, depth)
        ids = self.intro + hay[:at] + needle + hay[at:] + self.question
        return NeedleCase(length, depth, trial, passkey, tuple(ids), len(self.intro) + at)

    def _insertion_point(self, hay: list[int], depth: float) -> int:
        """The sentence boundary (index after a sentence-ending token, or either end) nearest depth * len."""
        target = round(depth * len(hay))
        bounds = [0, len(hay)] + [i + 1 for i, t in enumerate(hay) if t in self.sentence_ends]
        return min(bounds, key=lambda b: (abs(b - target), b))


def check_context(config: PretrainedConfig, cfg: NeedleConfig) -> None:
    check_fits_context(config, max(cfg.lengths), cfg.max_new_tokens, ("lengths", "max_new_tokens"))


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cases: list[NeedleCase], cfg: NeedleConfig
) -> list[str]:
    """Greedy answers, decoded; cases of equal length go through generate() together (no padding)."""
    generation = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    by_length: dict[int, list[int]] = {}
    for i, case in enumerate(cases):
        by_length.setdefault(case.length, []).append(i)
    answers: dict[int, str] = {}
    for length, indices in sorted(by_length.items()):
        for k in range(0, len(indices), cfg.batch_size):
            batch = indices[k : k + cfg.batch_size]
            ids = torch.tensor([cases[i].input_ids for i in batch], device=model.device)  # (B, L)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation)
            for i, row in zip(batch, out[:, length:]):  # (B, new tokens)
                answers[i] = tokenizer.decode(row, skip_special_tokens=True)
        logger.info("needle: length %d done (%d/%d prompts)", length, len(answers), len(cases))
    return [answers[i] for i in range(len(cases))]


def first_number(text: str) -> str:
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def run_needle(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: NeedleConfig) -> NeedleResult:
    """Accuracy over the grid cfg.lengths x cfg.depths, cfg.trials passkeys per cell."""
    check_context(model.config, cfg)
    prompts = NeedlePrompts(tokenizer, cfg, load_haystack(cfg.haystack_paths))
    cases = [prompts.case(n, d, t) for n in cfg.lengths for d in cfg.depths for t in range(cfg.trials)]
    answers = generate_answers(model, tokenizer, cases, cfg)
    trials = tuple(
        NeedleTrial(c.length, c.depth, c.trial, c.passkey, a, first_number(a) == c.passkey)
        for c, a in zip(cases, answers)
    )
    accuracy = tuple(
        tuple(
            sum(t.correct for t in trials if (t.length, t.depth) == (n, d)) / cfg.trials for d in cfg.depths
        )
        for n in cfg.lengths
    )
    return NeedleResult(tuple(cfg.lengths), tuple(cfg.depths), accuracy, trials)
