"""Stage `finetune`: distil the original model into the converted one on packed text, then save it.

Training checkpoints go to a local work folder named by the stage's cache key, so a killed run of the same
call resumes from its last checkpoint; the finished model goes to the artifact store. The student, the teacher and
the sampling of data-free rows run on the worker's device (`MHA2MLA_DEVICE`, default: CUDA when present).
"""

from __future__ import annotations

import copy

import torch
from pydantic import BaseModel, ConfigDict, Field

from infra.tracking import log_metrics, stage_run
from mha2mla_core.finetune import finetune as train
from mha2mla_core.training.config import FinetuneConfig
from mha2mla_core.training.packing import pack_texts
from mha2mla_core.training.synthetic import mix_in_continuations
from tasks.common import (
    DatasetInput,
    RunLink,
    StageResult,
    artifact_key,
    context,
    finish_stage,
    stage_task,
    work_dir,
)
from tasks.inputs import DataSource, ModelSource, load_checkpoint, load_source, read_documents, save_checkpoint

STAGE = "finetune"


class FinetuneParams(BaseModel):
    """Which text trains the converted model, and the core's training config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str  # HF dataset id, local txt/jsonl/parquet (file or dir), s3:// URI; never the evaluation text
    text_field: str = "text"
    split: str = "train"
    limit_chars: int | None = None
    synthetic_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of rows sampled from the original (data-free)
    train: FinetuneConfig = FinetuneConfig()


CODE = ("mha2mla_core.finetune", "mha2mla_core.training.packing", "mha2mla_core.training.losses",
        "mha2mla_core.training.synthetic")  # fmt: skip


@stage_task(STAGE, code=CODE)
def finetune(
    model: ModelSource, checkpoint: StageResult, data: DataSource, config: FinetuneParams, run: RunLink
) -> StageResult:
    """Train a private copy of `checkpoint` with the original `model` as teacher (and as the source of the sampled
    rows of `synthetic_fraction`); metrics every log step."""
    device = training_device(context().settings.device)
    params = {**config.model_dump(mode="json"), "source": data.source, "device": str(device)}
    with stage_run(run.run_name(STAGE), params, parent_run_id=run.parent_run_id):
        train_cfg = config.train
        original = load_source(model)[0] if train_cfg.kd_weight > 0 or config.synthetic_fraction > 0 else None
        original = original if original is None or device.type == "cpu" else copy.deepcopy(original).to(device)
        student, tokenizer = load_checkpoint(checkpoint, shared=False)
        texts = read_documents(data, config.text_field, config.split, config.limit_chars)
        rows = mix_in_continuations(original, pack_texts(tokenizer, texts, train_cfg.seq_len), config.synthetic_fraction,
                                    train_cfg.max_tokens // train_cfg.seq_len, seed=train_cfg.seed)  # fmt: skip
        teacher = original if train_cfg.kd_weight > 0 else None
        result = train(student.to(device), teacher, rows, train_cfg, checkpoint_dir=work_dir(STAGE),
                       callbacks=[lambda event: log_metrics(event.metrics, step=event.step)])  # fmt: skip
        del original, teacher
        output = save_checkpoint(student.cpu().eval(), tokenizer, artifact_key(model.slug, STAGE, "model"))
        dataset = DatasetInput(name="finetune", digest=data.digest, source=data.uri)
        metrics = {"final_loss": result.final_loss, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s}
        return finish_stage(STAGE, output, params=params, metrics=metrics, datasets=(dataset,))


def training_device(setting: str) -> torch.device:
    """The device `MHA2MLA_DEVICE` names on this worker (auto: CUDA when present); checked before anything loads."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA devices" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"MHA2MLA_DEVICE={setting!r} but this worker has {found}; set it to auto or cpu")
    return device
