"""Perplexity of a causal LM on a text, in fixed windows of predicted tokens.

The project's standard protocol (`WIKITEXT2_PROTOCOL`, the defaults of `perplexity`):
- text: WikiText-2 raw test (`shared/data/text_eval/wikitext-2-raw/wiki.test.raw`) read as stored, CRLF kept;
- tokenized whole with the tokenizer's own defaults (`tokenizer(text)`: a BOS is added only where the tokenizer
  adds one by default; SmolLM2's does not), then cut to the first `max_tokens` = 16,384 tokens;
- every token after the first is predicted exactly once: block k predicts tokens [1 + k*stride, 1 + (k+1)*stride)
  from an input that starts `window - stride` tokens before the block's first context token, so a prediction
  sees at most `window` tokens. Default stride = window: non-overlapping blocks of 512 predicted tokens, each
  input being the token before the block plus the block (513 tokens); the last block predicts 511, so 16,383
  tokens are predicted in all;
- logits in fp32, mean NLL over all predicted tokens, PPL = exp(mean NLL).

A model whose latent cache is quantized (an MLA config with `kv_cache_quant`, `mha2mla convert --kv-bits 4`) is
scored through that cache: each block is fed one token at a time, so every prediction reads the earlier tokens as
int4/int2 codes (all but the last `residual_length`), as it does when serving. One forward over the block would
never read the cache, and would score such a model as if it were not quantized. The predictions are the same ones.

Legend: B windows per batch, L window input length, V vocabulary.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mha2mla_core.evaluation.paths import WIKITEXT2_TEST, read_text

logger = logging.getLogger(__name__)

# Windows are batched so that one batch's fp32 logits stay under this many bytes (speed only: results are
# the same for any batching up to float rounding).
LOGITS_BYTES_PER_BATCH = 1 << 30


def check_max_tokens(max_tokens: int) -> None:
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens} must be >= 2 (one token of context, one predicted)")


def check_windows(window: int, stride: int | None) -> None:
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 token")
    if stride is not None and not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}]; use None for non-overlapping windows")


@dataclass(frozen=True)
class PerplexityConfig:
    """Which text and which windows; the defaults are the project's standard protocol."""

    text_path: Path = field(default=WIKITEXT2_TEST)
    window: int = 512  # most tokens of context a prediction sees
    max_tokens: int = 16384  # the first tokens of the tokenized text that are used
    stride: int | None = None  # predicted tokens per block; None = window (non-overlapping)

    def __post_init__(self) -> None:
        check_windows(self.window, self.stride)
        check_max_tokens(self.max_tokens)


WIKITEXT2_PROTOCOL = PerplexityConfig()


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    predicted_tokens: int
    windows: int
    window: int
    stride: int
    text_sha256: str
    dtype: str  # the model's parameter dtype (logits are always scored in fp32)


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, first_target, end) per block: input ids[start:end], scored targets ids[first_target:end]."""
    spans, first = [], 1
    while first < n_tokens:
        end = min(first + stride, n_tokens)
        spans.append((max(0, first - 1 - (window - stride)), first, end))
        first = end
    return spans


@torch.inference_mode()
def perplexity_of_ids(
    model: PreTrainedModel, ids: torch.Tensor, window: int, stride: int | None = None
) -> tuple[float, int, int]:
    """(mean NLL, predicted tokens, windows) of a 1-D id tensor; see the module docstring for the blocks."""
    check_windows(window, stride)
    if ids.numel() < 2:
        raise ValueError(f"{ids.numel()} token(s) given; perplexity needs at least 2")
    stride = window if stride is None else stride
    spans = window_spans(ids.numel(), window, stride)
    per_batch = max(1, LOGITS_BYTES_PER_BATCH // ((window + 1) * model.config.vocab_size * 4))
    ids = ids.to(model.device)
    total_nll, predicted = 0.0, 0
    through_cache = bool(getattr(model.config, "kv_cache_quant", None))
    for batch in _equal_length_batches(spans, per_batch):
        inputs = torch.stack([ids[start:end] for start, _, end in batch])  # (B, L)
        if through_cache:
            logits = logits_through_cache(model, inputs)
        else:
            logits = model(input_ids=inputs, use_cache=False).logits.float()  # (B, L, V)
        start, first, end = batch[0]
        scored = logits[:, first - 1 - start : end - 1 - start]  # (B, end - first, V)
        targets = inputs[:, first - start :]  # (B, end - first)
        total_nll += F.cross_entropy(scored.flatten(0, 1), targets.flatten(), reduction="sum").item()
        predicted += targets.numel()
    return total_nll / predicted, predicted, len(spans)


@torch.inference_mode()
def logits_through_cache(model: PreTrainedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(B, L, V) fp32 logits of `inputs` (B, L) fed one token at a time through a fresh cache of the model's own kind
    (`make_cache`: a quantized latent cache where the config asks for one): the decode path a served model runs."""
    cache = model.make_cache()
    steps = [model(input_ids=inputs[:, t : t + 1], past_key_values=cache, use_cache=True).logits.float()
             for t in range(inputs.shape[1])]  # fmt: skip
    return torch.cat(steps, dim=1)


def _equal_length_batches(spans: list[tuple[int, int, int]], per_batch: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive spans with the same input length and target offset, at most `per_batch` together."""
    batches: list[list[tuple[int, int, int]]] = []
    for span in spans:
        shape = (span[2] - span[0], span[1] - span[0])
        last = batches[-1] if batches else None
        if last and len(last) < per_batch and (last[0][2] - last[0][0], last[0][1] - last[0][0]) == shape:
            last.append(span)
        else:
            batches.append([span])
    return batches


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    window: int = WIKITEXT2_PROTOCOL.window,
    max_tokens: int = WIKITEXT2_PROTOCOL.max_tokens,
    stride: int | None = WIKITEXT2_PROTOCOL.stride,
) -> PerplexityResult:
    """Perplexity of `text` (tokenized whole, first `max_tokens` tokens) in windows; defaults = the protocol."""
    check_windows(window, stride)
    check_max_tokens(max_tokens)
    ids = tokenizer(text, verbose=False)["input_ids"][:max_tokens]
    nll, predicted, windows = perplexity_of_ids(model, torch.tensor(ids), window, stride)
    logger.info("perplexity: %d windows, %d predicted tokens, mean NLL %.4f", windows, predicted, nll)
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        predicted_tokens=predicted,
        windows=windows,
        window=window,
        stride=window if stride is None else stride,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        dtype=str(model.dtype).removeprefix("torch."),
    )


def run_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: PerplexityConfig = WIKITEXT2_PROTOCOL
) -> PerplexityResult:
    """`perplexity` on the file `cfg.text_path`, read as stored."""
    text = read_text(cfg.text_path, "perplexity text", "pass another file as PerplexityConfig(text_path=...)")
    return perplexity(model, tokenizer, text, cfg.window, cfg.max_tokens, cfg.stride)
