"""The evaluation suite: one config for every stage, one call per model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from mha2mla_core.evaluation.inference import (
    InferenceConfig,
    check_inference,
    probe_kv_bytes_per_token,
    reported_kv_bytes_per_token,
    run_inference,
)
from mha2mla_core.evaluation.multiple_choice import TASK_FILES, MCConfig, check_mc_data, run_multiple_choice
from mha2mla_core.evaluation.needle import NeedleConfig, check_context, haystack_files, run_needle
from mha2mla_core.evaluation.paths import read_text
from mha2mla_core.evaluation.perplexity import PerplexityConfig, PerplexityResult, perplexity, run_perplexity
from mha2mla_core.evaluation.report import EvalResult, mc_summary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Each stage's config; None skips the stage. The defaults run everything on the shared data."""

    perplexity: PerplexityConfig | None = field(default_factory=PerplexityConfig)
    multiple_choice: MCConfig | None = field(default_factory=MCConfig)
    needle: NeedleConfig | None = field(default_factory=NeedleConfig)
    inference: InferenceConfig | None = field(default_factory=InferenceConfig)
    kv_probe_tokens: int | None = None  # also read KV bytes/token from the cache after a forward of this many tokens

    def __post_init__(self) -> None:
        if self.kv_probe_tokens is not None and self.kv_probe_tokens < 1:
            raise ValueError(f"kv_probe_tokens={self.kv_probe_tokens} must be >= 1, or None for no probe")


def check_files(cfg: EvalConfig, perplexity_file: bool = True) -> None:
    """Every data file of the configured stages exists (the perplexity text only if `perplexity_file`)."""
    if cfg.perplexity and perplexity_file:
        read_text(cfg.perplexity.text_path, "perplexity text", "pass another file as PerplexityConfig(text_path=...)")
    if cfg.multiple_choice:
        check_mc_data(cfg.multiple_choice)
    if cfg.needle:
        for path in haystack_files(cfg.needle.haystack_paths):
            if not path.is_file():
                raise FileNotFoundError(f"haystack text {path} does not exist; pass NeedleConfig(haystack_paths=...)")


def data_files(cfg: EvalConfig) -> list[Path]:
    """The local files the multiple-choice and needle suites read (not the perplexity text, passed separately)."""
    files = []
    if cfg.multiple_choice and cfg.multiple_choice.source == "local":
        files += [Path(cfg.multiple_choice.data_dir) / TASK_FILES[t] for t in cfg.multiple_choice.tasks]
    if cfg.needle:
        files += haystack_files(cfg.needle.haystack_paths)
    return files


def check_lengths(config: PretrainedConfig, cfg: EvalConfig) -> None:
    """The needle and inference lengths fit the model's positions; `config` may be read without the weights."""
    if cfg.needle:
        check_context(config, cfg.needle)
    if cfg.inference:
        check_inference(config, cfg.inference)


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    name: str = "model",
    perplexity_text: str | None = None,
) -> EvalResult:
    """Run the configured stages on one model (any HF causal LM, MLA models included).

    `perplexity_text` is scored in place of the file `cfg.perplexity.text_path` (windows as cfg.perplexity):
    for a text that came from elsewhere (an object store, a dataset).
    """
    check_files(cfg, perplexity_file=perplexity_text is None)
    check_lengths(model.config, cfg)
    model.eval()
    seconds: dict[str, float] = {}

    def timed(stage: str, run, stage_cfg):
        if stage_cfg is None:
            return None
        start = time.perf_counter()
        out = run(stage_cfg)
        seconds[stage] = time.perf_counter() - start
        logger.info("%s: %s done in %.1f s", name, stage, seconds[stage])
        return out

    ppl = timed("perplexity", lambda c: _perplexity(model, tokenizer, c, perplexity_text), cfg.perplexity)
    mc = timed("multiple_choice", lambda c: run_multiple_choice(model, tokenizer, c), cfg.multiple_choice)
    if mc:  # in the log now, so that a run cut off in a later stage keeps them
        logger.info("%s: multiple choice: %s", name, mc_summary(mc))
    needle = timed("needle", lambda c: run_needle(model, tokenizer, c), cfg.needle)
    inference = timed("inference", lambda c: run_inference(model, c), cfg.inference)
    probe = timed("kv_probe", lambda n: probe_kv_bytes_per_token(model, n), cfg.kv_probe_tokens)
    reported = reported_kv_bytes_per_token(model)
    _cross_check_kv(name, inference, reported)
    return EvalResult(
        name=name,
        model_type=model.config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        perplexity=ppl,
        multiple_choice=mc or {},
        needle=needle,
        inference=inference or (),
        kv_bytes_per_token_reported=reported,
        kv_bytes_per_token_probe=probe,
        seconds=seconds,
    )


def _perplexity(model, tokenizer, cfg: PerplexityConfig, text: str | None) -> PerplexityResult:
    if text is None:
        return run_perplexity(model, tokenizer, cfg)
    return perplexity(model, tokenizer, text, cfg.window, cfg.max_tokens, cfg.stride)


def _cross_check_kv(name: str, inference: tuple | None, reported: float | None) -> None:
    """Warn when the cache measured after prefill disagrees with the model's own kv_bytes_per_token()."""
    if inference and reported is not None and inference[0].kv_bytes_per_token != reported:
        logger.warning(
            "%s: KV bytes/token measured from the cache (%s) differ from model.kv_bytes_per_token() (%s)",
            name, inference[0].kv_bytes_per_token, reported,
        )  # fmt: skip
