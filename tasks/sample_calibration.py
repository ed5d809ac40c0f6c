"""Stage `sample-calibration`: a seeded, content-hashed sample of calibration token ids, optionally continued by
the original model itself (data-free calibration)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from mha2mla_core.conversion.calibration import continue_with_model
from mha2mla_core.conversion.calibration import sample_calibration as sample_ids
from infra.stage import DatasetInput, RunLink, StageOutput, artifact_key, context, stage_task
from tasks.inputs import (
    DataSource, ModelSource, load_source, load_source_tokenizer, read_documents, sampler_on, save_tensors, worker_device,
)

STAGE = "sample-calibration"


class CalibrationParams(BaseModel):
    """Which text calibrates the conversion, and how much of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str | None = None  # HF dataset id, local txt/jsonl/parquet (file or dir), s3:// URI; None = packaged books
    num_tokens: int = Field(8192, gt=0)
    seed: int = 0
    text_field: str = "text"
    split: str = "train"
    limit_chars: int | None = Field(4_000_000, gt=0)  # read at most this much of a large source
    # data-free: each window keeps its first 4 tokens and the original model samples the rest
    model_samples: bool = False


def _params(config: CalibrationParams, seq_len: int, data: DataSource, **_) -> dict:
    return {**config.model_dump(mode="json"), "seq_len": seq_len, "source": data.source}


@stage_task(STAGE, code=("mha2mla_core.conversion.calibration", "mha2mla_core.data", "mha2mla_core.training.synthetic",
                         "mha2mla_core.modeling.decoding"), params=_params)  # fmt: skip
def sample_calibration(
    model: ModelSource, data: DataSource, config: CalibrationParams, seq_len: int, run: RunLink
) -> StageOutput:
    """Tokenize the calibration documents and keep `num_tokens` ids in whole windows of `seq_len`."""
    tokenizer = load_source(model)[1] if config.model_samples else load_source_tokenizer(model)
    texts = read_documents(data, config.text_field, config.split, config.limit_chars)
    sample = sample_ids(texts, tokenizer, config.num_tokens, seq_len, config.seed)
    if config.model_samples:  # on the worker's device (MHA2MLA_DEVICE); the ids come back on the CPU
        sampler = sampler_on(load_source(model)[0], worker_device(context().settings.device))
        sample = continue_with_model(sampler, sample, seq_len, seed=config.seed)
    key = artifact_key(model.slug, STAGE, "calibration.safetensors")
    output = save_tensors({"input_ids": sample.input_ids}, key, metadata={"digest": sample.digest})
    dataset = DatasetInput(name="calibration", digest=sample.digest, source=data.uri)
    return StageOutput(output, metrics={"num_tokens": sample.num_tokens}, datasets=(dataset,))
