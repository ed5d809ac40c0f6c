"""The evaluation suite: one config for every stage, one call per model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mha2mla_core.evaluation.inference import (
    InferenceConfig,
    check_inference,
    reported_kv_bytes_per_token,
    run_inference,
)
from mha2mla_core.evaluation.multiple_choice import MCConfig, check_mc_data, run_multiple_choice
from mha2mla_core.evaluation.needle import NeedleConfig, check_context, haystack_files, run_needle
from mha2mla_core.evaluation.paths import read_text
from mha2mla_core.evaluation.perplexity import PerplexityConfig, run_perplexity
from mha2mla_core.evaluation.report import EvalResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Each stage's config; None skips the stage. The defaults run everything on the shared data."""

    perplexity: PerplexityConfig | None = field(default_factory=PerplexityConfig)
    multiple_choice: MCConfig | None = field(default_factory=MCConfig)
    needle: NeedleConfig | None = field(default_factory=NeedleConfig)
    inference: InferenceConfig | None = field(default_factory=InferenceConfig)


def check_inputs(model: PreTrainedModel, cfg: EvalConfig) -> None:
    """Every file and length check of the configured stages, before any model work."""
    if cfg.perplexity:
        read_text(cfg.perplexity.text_path, "perplexity text", "pass another file as PerplexityConfig(text_path=...)")
    if cfg.multiple_choice:
        check_mc_data(cfg.multiple_choice)
    if cfg.needle:
        check_context(model, cfg.needle)
        for path in haystack_files(cfg.needle.haystack_paths):
            if not path.is_file():
                raise FileNotFoundError(f"haystack text {path} does not exist; pass NeedleConfig(haystack_paths=...)")
    if cfg.inference:
        check_inference(model, cfg.inference)


def evaluate_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, name: str = "model"
) -> EvalResult:
    """Run the configured stages on one model (any HF causal LM, MLA models included)."""
    check_inputs(model, cfg)
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

    ppl = timed("perplexity", lambda c: run_perplexity(model, tokenizer, c), cfg.perplexity)
    mc = timed("multiple_choice", lambda c: run_multiple_choice(model, tokenizer, c), cfg.multiple_choice)
    needle = timed("needle", lambda c: run_needle(model, tokenizer, c), cfg.needle)
    inference = timed("inference", lambda c: run_inference(model, c), cfg.inference)
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
        seconds=seconds,
    )


def _cross_check_kv(name: str, inference: tuple | None, reported: float | None) -> None:
    """Warn when the cache measured after prefill disagrees with the model's own kv_bytes_per_token()."""
    if inference and reported is not None and inference[0].kv_bytes_per_token != reported:
        logger.warning(
            "%s: KV bytes/token measured from the cache (%s) differ from model.kv_bytes_per_token() (%s)",
            name, inference[0].kv_bytes_per_token, reported,
        )  # fmt: skip
