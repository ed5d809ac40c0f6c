"""Evaluation stage: perplexity, zero-shot multiple choice (lm-eval), needle retrieval, inference cost.

    from mha2mla_core.evaluation import EvalConfig, MCConfig, compare, evaluate_model
    cfg = EvalConfig(multiple_choice=MCConfig(limit=100))
    results = {"original": evaluate_model(model, tok, cfg, "original"), "mla": evaluate_model(mla, tok, cfg, "mla")}
    print(compare(results).to_markdown())

Works on any HF causal LM; lm-eval, matplotlib and psutil are imported only by the stages that use them. The
submodules keep their names (`perplexity.perplexity(model, tok, text)` is the raw-text entry point).
"""

from mha2mla_core.evaluation.inference import (
    InferenceConfig,
    InferencePoint,
    cache_bytes_per_token,
    probe_kv_bytes_per_token,
    run_inference,
)
from mha2mla_core.evaluation.multiple_choice import TASK_FILES, MCConfig, MCScore, run_multiple_choice
from mha2mla_core.evaluation.needle import NeedleConfig, NeedleResult, run_needle
from mha2mla_core.evaluation.perplexity import WIKITEXT2_PROTOCOL, PerplexityConfig, PerplexityResult, run_perplexity
from mha2mla_core.evaluation.report import Comparison, EvalResult, compare, flat_metrics
from mha2mla_core.evaluation.suite import EvalConfig, evaluate_model

__all__ = [
    "TASK_FILES",
    "WIKITEXT2_PROTOCOL",
    "Comparison",
    "EvalConfig",
    "EvalResult",
    "InferenceConfig",
    "InferencePoint",
    "MCConfig",
    "MCScore",
    "NeedleConfig",
    "NeedleResult",
    "PerplexityConfig",
    "PerplexityResult",
    "cache_bytes_per_token",
    "compare",
    "evaluate_model",
    "flat_metrics",
    "probe_kv_bytes_per_token",
    "run_inference",
    "run_multiple_choice",
    "run_needle",
    "run_perplexity",
]
