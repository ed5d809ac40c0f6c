"""Deterministic, content-hashed calibration samples.

The same texts, tokenizer and parameters give the same token ids and the same digest on every machine:
windows are ranked by the sha256 of (seed, their token ids), never by a platform RNG.

`continue_with_model` makes a data-free variant: every window keeps its first tokens and the model samples the
rest, so the calibration activations follow the model's own distribution rather than the sampled text's domain
(SmolLM2-135M, output-aware SVD, wikitext PPL at zero shot: 652.6 against 917.0 on the books it started from).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mha2mla_core.modeling.decoding import sample_continuations

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_FILE = "calibration_books.txt"
HELDOUT_FILE = "heldout_books.txt"  # the default evaluation text: never calibrated or trained on


def packaged_text_path(name: str):
    """A text file shipped in mha2mla_core/resources (see its README.md)."""
    return resources.files("mha2mla_core").joinpath("resources", name)


@dataclass(frozen=True)
class CalibrationSample:
    input_ids: torch.Tensor  # (N,) int64
    digest: str  # sha256 of the ids and the sampling parameters

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def default_calibration_texts() -> list[str]:
    """The public-domain passages shipped with the package (see mha2mla_core/resources/README.md)."""
    text = packaged_text_path(DEFAULT_CALIBRATION_FILE).read_text(encoding="utf-8")
    return [part.strip() for part in text.split("\f") if part.strip()]


def _window_rank(seed: int, window: np.ndarray) -> str:
    return hashlib.sha256(f"{seed}:".encode() + window.astype("<i4").tobytes()).hexdigest()


def sample_calibration(
    texts: Sequence[str], tokenizer, num_tokens: int = 8192, seq_len: int = 512, seed: int = 0
) -> CalibrationSample:
    """Sample `num_tokens` ids as whole windows of `seq_len` tokens, chosen by hash rank.

    Texts are tokenized without special tokens and joined by the EOS token, then cut into windows.
    """
    if num_tokens <= 0 or seq_len <= 0:
        raise ValueError(f"num_tokens={num_tokens} and seq_len={seq_len} must be positive")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("the calibration set is empty: pass at least one non-empty text (or use the default texts)")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
    stream = np.asarray(ids, dtype=np.int64)
    if stream.size < num_tokens:
        logger.warning("calibration text has %d tokens, fewer than the %d asked for; using all", stream.size, num_tokens)
    width = min(seq_len, stream.size)
    windows = [stream[i : i + width] for i in range(0, stream.size - width + 1, width)]
    ranked = sorted(windows, key=lambda w: _window_rank(seed, w))
    chosen = np.concatenate(ranked[: -(-num_tokens // width)])[:num_tokens]
    meta = f"n={num_tokens};L={seq_len};seed={seed};".encode()
    digest = hashlib.sha256(meta + chosen.astype("<i4").tobytes()).hexdigest()
    return CalibrationSample(input_ids=torch.from_numpy(chosen.copy()), digest=digest)


def continue_with_model(
    model: nn.Module, sample: CalibrationSample, seq_len: int, prompt_tokens: int = 4, seed: int = 0
) -> CalibrationSample:
    """`sample` with each whole window of `seq_len` ids rewritten by `model`: its first `prompt_tokens` ids kept, the
    rest sampled (temperature 1, seeded). A last partial window stays as it was."""
    if not 1 <= prompt_tokens < seq_len:
        raise ValueError(f"prompt_tokens={prompt_tokens} must be in [1, seq_len={seq_len})")
    n = sample.num_tokens // seq_len
    if n == 0:
        raise ValueError(f"the sample has {sample.num_tokens} tokens, less than one window of seq_len={seq_len}")
    windows = sample.input_ids[: n * seq_len].view(n, seq_len)  # (n, seq_len)
    sampled = sample_continuations(model, windows[:, :prompt_tokens], seq_len, seed=seed)  # (n, seq_len)
    ids = torch.cat([sampled.flatten(), sample.input_ids[n * seq_len :]])  # (N,)
    meta = f"model-continued:{sample.digest};P={prompt_tokens};seed={seed};".encode()
    return CalibrationSample(input_ids=ids, digest=hashlib.sha256(meta + ids.numpy().astype("<i4").tobytes()).hexdigest())
