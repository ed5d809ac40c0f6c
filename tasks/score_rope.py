"""Stage `score-rope`: per-layer, per-KV-head 2-norm scores of the RoPE frequency pairs, and their heatmap."""

from __future__ import annotations

from mha2mla_core.conversion.convert import score_rope as score_pairs
from infra.stage import RunLink, StageOutput, StageResult, artifact_key, context, stage_task
from tasks.inputs import ModelSource, load_source, load_tensors, save_tensors
from tasks.plots import rope_heatmap

STAGE = "score-rope"


@stage_task(STAGE, code=("mha2mla_core.conversion.convert", "mha2mla_core.conversion.rope"), params=lambda seq_len, **_: {"seq_len": seq_len})
def score_rope(model: ModelSource, calibration: StageResult, seq_len: int, run: RunLink) -> StageOutput:
    """Scores (layers, Hkv, D/2) over the calibration tokens, in sequences of `seq_len`."""
    source, _ = load_source(model)
    scores = score_pairs(source, load_tensors(calibration)["input_ids"], seq_len)  # (layers, Hkv, D/2)
    output = save_tensors({"scores": scores}, artifact_key(model.slug, STAGE, "rope_scores.safetensors"))
    heatmap = context().store.put_bytes(rope_heatmap(scores), artifact_key(model.slug, STAGE, "rope_scores.png"))
    metrics = {"layers": scores.shape[0], "score_max": scores.max().item()}
    return StageOutput(output, files={"rope_scores.png": heatmap}, metrics=metrics)
