"""Stage `evaluate`: perplexity on a held-out text and KV-cache bytes per token, for one model."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from infra.tracking import stage_run
from mha2mla_core.evaluation.perplexity import perplexity
from tasks.common import RunLink, StageResult, artifact_key, context, finish_stage, stage_task
from tasks.inputs import DataSource, ModelSource, load_model_input, read_text

STAGE = "evaluate"


class EvalParams(BaseModel):
    """The held-out text and how much of it is scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str | None = None  # local file, s3:// URI or HF dataset id; None = the packaged held-out books
    max_tokens: int = Field(4096, ge=2)  # first tokens of the tokenized text scored
    window: int = Field(512, ge=1)  # context per prediction; non-overlapping blocks of predicted tokens
    kv_probe_tokens: int = Field(1024, ge=1)  # context at which KV bytes/token are read from the cache


@torch.no_grad()
def kv_bytes_per_token(model, probe_tokens: int) -> float:
    """Cache bytes per token per sequence, read from the cache's own tensors after a `probe_tokens` forward
    (long enough for a quantized cache to hold codes beyond its full-precision residual window)."""
    if hasattr(model, "kv_bytes_per_token"):
        return model.kv_bytes_per_token(probe_tokens)
    out = model(input_ids=torch.zeros(1, probe_tokens, dtype=torch.long, device=model.device), use_cache=True)
    layers = out.past_key_values.layers
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)) / probe_tokens


@stage_task(STAGE, code=("mha2mla_core.evaluation.perplexity", "mha2mla_core.modeling_mla"))
def evaluate(model: ModelSource | StageResult, slug: str, text: DataSource, config: EvalParams, run: RunLink) -> StageResult:
    """PPL (fp32 logits) of the first `max_tokens` tokens of `text`, and measured KV bytes/token."""
    params = {**config.model_dump(mode="json"), "source": text.source}
    with stage_run(run.run_name(STAGE), params, parent_run_id=run.parent_run_id):
        network, tokenizer = load_model_input(model)
        ppl = perplexity(network, tokenizer, read_text(text), window=config.window, max_tokens=config.max_tokens)
        metrics = {"ppl": ppl.ppl, "nll": ppl.nll, "predicted_tokens": ppl.predicted_tokens,
                   "kv_bytes_per_token": kv_bytes_per_token(network, config.kv_probe_tokens)}  # fmt: skip
        output = context().store.put_json(metrics, artifact_key(slug, STAGE, f"{run.label or 'model'}.json"))
        return finish_stage(STAGE, output, params=params, metrics=metrics)


def comparison_rows(original: StageResult, converted: dict[str, StageResult]) -> list[dict]:
    """One row per model: PPL, its change against the original, KV bytes/token and the cache saving."""
    base = original.metrics
    rows = [{"model": "original", "ppl": base["ppl"], "ppl_change_pct": 0.0,
             "kv_bytes_per_token": base["kv_bytes_per_token"], "kv_saving_pct": 0.0}]  # fmt: skip
    for label, result in converted.items():
        m = result.metrics
        rows.append({
            "model": label,
            "ppl": m["ppl"],
            "ppl_change_pct": 100 * (m["ppl"] / base["ppl"] - 1),
            "kv_bytes_per_token": m["kv_bytes_per_token"],
            "kv_saving_pct": 100 * (1 - m["kv_bytes_per_token"] / base["kv_bytes_per_token"]),
        })
    return rows
