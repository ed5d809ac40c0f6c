"""Stage `score-rope`: per-layer, per-KV-head 2-norm scores of the RoPE frequency pairs, and their heatmap."""

from __future__ import annotations

from infra.tracking import stage_run
from mha2mla_core.conversion.convert import score_rope as score_pairs
from tasks.common import RunLink, StageResult, artifact_key, context, finish_stage, stage_task
from tasks.inputs import ModelSource, load_source, load_tensors, save_tensors
from tasks.plots import rope_heatmap

STAGE = "score-rope"


@stage_task(STAGE, code=("mha2mla_core.conversion.convert", "mha2mla_core.conversion.rope"))
def score_rope(model: ModelSource, calibration: StageResult, seq_len: int, run: RunLink) -> StageResult:
    """Scores (layers, Hkv, D/2) over the calibration tokens, in sequences of `seq_len`."""
    with stage_run(run.run_name(STAGE), {"seq_len": seq_len}, parent_run_id=run.parent_run_id):
        source, _ = load_source(model)
        scores = score_pairs(source, load_tensors(calibration)["input_ids"], seq_len)  # (layers, Hkv, D/2)
        output = save_tensors({"scores": scores}, artifact_key(model.slug, STAGE, "rope_scores.safetensors"))
        heatmap = context().store.put_bytes(rope_heatmap(scores), artifact_key(model.slug, STAGE, "rope_scores.png"))
        metrics = {"layers": scores.shape[0], "score_max": scores.max().item()}
        return finish_stage(STAGE, output, params={"seq_len": seq_len}, files={"rope_scores.png": heatmap}, metrics=metrics)
