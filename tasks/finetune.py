"""Stages `finetune-data`, `reconstruct` and `finetune`: the training rows, a layer-wise fit, then distillation of
the original into the converted model.

`finetune-data` packs the fine-tuning text into rows of `seq_len` token ids and, with `synthetic_fraction`, samples a
share of them from the original model; the rows are an artifact, cached apart from training, so a training rerun
(another learning rate, a crash) never samples again. `reconstruct` fits each converted attention layer to the
original's output on the first rows (block-wise, as post-training quantization does). `finetune` then distils the
original into the whole model on all of them, end to end. Training checkpoints go to a local
work folder named by the stage's cache key, so a killed run of the same call resumes from its last checkpoint; the
finished model goes to the artifact store. Sampling and training run on the worker's device (`MHA2MLA_DEVICE`,
default: CUDA when present). On a worker with `MHA2MLA_GPUS` = N > 1, both run as N processes under torchrun
(`mha2mla_core.training.launch`: FSDP for training, each GPU sampling its share of the rows), with the same global batch
and the same seeds, so that the result is the same call and the same cache key whatever N is.
"""

from __future__ import annotations


import torch
from safetensors.torch import save_file
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra.tracking import log_metrics
from mha2mla_core.loading import load_model
from mha2mla_core.training.launch import SampleJob, TrainJob, launch_finetune, launch_sampling
from mha2mla_core.training.loop import finetune as train
from mha2mla_core.training.config import FinetuneConfig, ReconstructConfig
from mha2mla_core.training.packing import pack_texts
from mha2mla_core.training.reconstruct import reconstruct_attention
from mha2mla_core.training.synthetic import mix_in_continuations, num_sampled_rows
from infra.stage import (DatasetInput, RunLink, StageOutput, StageResult, artifact_key, context, scratch_dir, stage_task,
                         work_dir)  # fmt: skip
from tasks.inputs import (
    DataSource,
    ModelSource,
    checkpoint_dtype,
    load_checkpoint,
    load_source,
    load_tensors,
    on_device,
    read_documents,
    sampler_on,
    save_checkpoint,
    save_tensors,
    worker_device,
)

DATA_STAGE, RECON_STAGE, STAGE = "finetune-data", "reconstruct", "finetune"


class RowsParams(BaseModel):
    """What decides the training rows (and nothing that only decides the training): `FinetuneParams.rows()`, whose
    fields and FinetuneConfig's are the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_field: str
    split: str
    limit_chars: int | None
    synthetic_fraction: float  # share of rows sampled from the original (data-free)
    seq_len: int
    num_rows: int = Field(ge=1)  # rows sampled with synthetic_fraction > 0: the training budget's worth
    seed: int


class ReconstructParams(BaseModel):
    """What decides the block-wise reconstruction (the `reconstruct` stage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    config: ReconstructConfig
    tokens: int = Field(ge=1)  # of the first training rows, which the layers are fitted on
    # the rows are the calibration sample's flat ids, cut into windows of this many tokens (a conversion with no
    # fine-tuning); None: the rows of finetune-data
    seq_len: int | None = Field(None, ge=2)


class FinetuneParams(BaseModel):
    """Which text trains the converted model, and the core's training config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # HF dataset id, local txt/jsonl/parquet (file or dir), s3:// URI; never the evaluation text. None: data-free
    # (synthetic_fraction 1), the sampled rows' 4-token prompts taken from the packaged calibration books
    data: str | None = None
    text_field: str = "text"
    split: str = "train"
    limit_chars: int | None = None
    synthetic_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of rows sampled from the original (data-free)
    # block-wise reconstruction before end-to-end training (bench/finetune.py: 84.4 -> 69.3 PPL after 5M tokens);
    # None = straight to end-to-end training
    reconstruct: ReconstructConfig | None = ReconstructConfig(steps=300)
    reconstruct_tokens: int = Field(65_536, ge=1)  # of the first training rows, which the layers are fitted on
    train: FinetuneConfig = FinetuneConfig()

    @model_validator(mode="after")
    def _text_or_data_free(self) -> FinetuneParams:
        if self.data is None and self.synthetic_fraction < 1:
            raise ValueError(f"synthetic_fraction={self.synthetic_fraction} leaves {1 - self.synthetic_fraction:.0%} "
                             "of the rows to real text, but no data was given: name the fine-tuning text "
                             "(finetune.data, --finetune-data), or set synthetic_fraction to 1 for data-free "
                             "fine-tuning")  # fmt: skip
        return self

    def reconstruction(self) -> ReconstructParams | None:
        """The `reconstruct` stage's params; None when it is off."""
        if self.reconstruct is None:
            return None
        return ReconstructParams(config=self.reconstruct, tokens=self.reconstruct_tokens)

    def rows(self) -> RowsParams:
        t = self.train
        return RowsParams(text_field=self.text_field, split=self.split, limit_chars=self.limit_chars,
                          synthetic_fraction=self.synthetic_fraction, seq_len=t.seq_len,
                          num_rows=max(1, t.max_tokens // t.seq_len), seed=t.seed)  # fmt: skip


def _rows_device(config: RowsParams) -> torch.device:
    return worker_device(context().settings.device) if config.synthetic_fraction > 0 else torch.device("cpu")


def _rows_params(config: RowsParams, data: DataSource, **_) -> dict:
    device = _rows_device(config)
    return {**config.model_dump(mode="json"), "source": data.source, "device": str(device),
            "gpus": training_gpus(device)}  # fmt: skip


def _training_params(config: BaseModel, rows: StageResult, **_) -> dict:
    device = worker_device(context().settings.device)
    return {**config.model_dump(mode="json"), "rows": rows.uri, "device": str(device), "gpus": training_gpus(device)}


@stage_task(DATA_STAGE, params=_rows_params,
            code=("mha2mla_core.training.packing", "mha2mla_core.training.synthetic", "mha2mla_core.modeling.decoding"))
def finetune_data(model: ModelSource, data: DataSource, config: RowsParams, run: RunLink) -> StageOutput:
    """The training rows (N, seq_len) as int32 token ids: the packed documents, `synthetic_fraction` of them
    replaced by continuations the original model samples from their first tokens."""
    original, tokenizer = load_source(model)
    packed = pack_texts(tokenizer, read_documents(data, config.text_field, config.split, config.limit_chars),
                        config.seq_len)  # fmt: skip
    rows = _mix_rows(model, original, packed, config)
    output = save_tensors({"rows": rows.to(torch.int32)}, artifact_key(model.slug, DATA_STAGE, "rows.safetensors"))
    sampled = num_sampled_rows(config.synthetic_fraction, config.num_rows)
    metrics = {"rows": rows.shape[0], "tokens": rows.numel(), "sampled_rows": sampled}
    dataset = DatasetInput(name="finetune-text", digest=data.digest, source=data.uri)
    return StageOutput(output, metrics=metrics, datasets=(dataset,))


@stage_task(RECON_STAGE, code=("mha2mla_core.training.reconstruct", "mha2mla_core.hub_code"), params=_training_params)
def reconstruct(
    model: ModelSource, checkpoint: StageResult, rows: StageResult, config: ReconstructParams, run: RunLink
) -> StageOutput:
    """Fit each attention layer of a private copy of `checkpoint` to the original `model`'s on the first rows (of
    finetune-data, or of the calibration sample when the conversion has no fine-tuning)."""
    device = worker_device(context().settings.device)
    teacher, student, tokenizer, ids = _training_inputs(model, checkpoint, rows, device, True, config.seq_len)
    first = ids[: -(-config.tokens // ids.shape[1])]  # (n, seq_len): at least `tokens` tokens
    fit = reconstruct_attention(student, teacher, first.to(device), config.config)
    del teacher
    output = save_checkpoint(student.cpu().eval(), tokenizer, artifact_key(model.slug, RECON_STAGE, "model"),
                             checkpoint_dtype(checkpoint))
    before, after = fit.rel_mse_before, fit.rel_mse_after
    metrics = {"rel_mse_before": sum(before) / len(before), "rel_mse_after": sum(after) / len(after),
               "seconds": fit.seconds, "tokens": first.numel()}  # fmt: skip
    dataset = DatasetInput(name="calibration" if config.seq_len else "finetune", digest=rows.sha256, source=rows.uri)
    return StageOutput(output, metrics=metrics, datasets=(dataset,))


@stage_task(STAGE, code=("mha2mla_core.training.loop", "mha2mla_core.training.losses", "mha2mla_core.hub_code"),
        params=_training_params)
def finetune(
    model: ModelSource, checkpoint: StageResult, rows: StageResult, config: FinetuneParams, run: RunLink
) -> StageOutput:
    """Train a private copy of `checkpoint` on `rows` (from `finetune_data`) with the original `model` as teacher;
    metrics every log step."""
    device = worker_device(context().settings.device)
    train_cfg, gpus = config.train, training_gpus(device)
    if gpus > 1:
        result, student, tokenizer = _train_on_gpus(model, checkpoint, rows, train_cfg, (device, gpus))
    else:
        teacher, student, tokenizer, ids = _training_inputs(model, checkpoint, rows, device, train_cfg.needs_teacher)
        result = train(student, teacher, ids, train_cfg, checkpoint_dir=work_dir(STAGE), callbacks=[_log_event])
        del teacher
    output = save_checkpoint(student.cpu().eval(), tokenizer, artifact_key(model.slug, STAGE, "model"),
                             checkpoint_dtype(checkpoint))
    dataset = DatasetInput(name="finetune", digest=rows.sha256, source=rows.uri)
    metrics = {"final_loss": result.final_loss, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s}
    return StageOutput(output, metrics=metrics, datasets=(dataset,))


def _log_event(event) -> None:
    log_metrics(event.metrics, step=event.step)


def _mix_rows(model: ModelSource, original: torch.nn.Module, packed: torch.Tensor, config: RowsParams) -> torch.Tensor:
    """`mix_in_continuations` of `packed` (N, seq_len); on MHA2MLA_GPUS > 1 GPUs each one samples its share."""
    device = _rows_device(config)
    gpus = training_gpus(device)
    if gpus == 1 or config.synthetic_fraction == 0:
        sampler = sampler_on(original, device)
        return mix_in_continuations(sampler, packed, config.synthetic_fraction, config.num_rows, seed=config.seed)
    with scratch_dir() as tmp:
        save_file({"rows": packed.contiguous()}, tmp / "packed.safetensors")
        job = SampleJob(teacher=model.name, rows=str(tmp / "packed.safetensors"), fraction=config.synthetic_fraction,
                        num_rows=config.num_rows, seed=config.seed)  # fmt: skip
        return launch_sampling(job, gpus, work_dir(DATA_STAGE) / f"gpus-{gpus}", device_type=device.type)


def _train_on_gpus(model: ModelSource, checkpoint: StageResult, rows: StageResult, cfg: FinetuneConfig,
                   where: tuple[torch.device, int]) -> tuple:  # fmt: skip
    """(FinetuneResult, trained student, tokenizer) of `cfg` on `where` = (device, N) as N processes under torchrun;
    checkpoints, the launch log and the trained model in the stage's work folder, so that a relaunch resumes."""
    (device, gpus), store = where, context().store
    work = work_dir(STAGE) / f"gpus-{gpus}"
    with scratch_dir() as tmp:
        student_dir = store.get_dir(checkpoint.uri, tmp / "student", sha256=checkpoint.sha256)
        rows_file = store.get_file(rows.uri, tmp / "rows.safetensors", sha256=rows.sha256)
        job = TrainJob(student=str(student_dir), teacher=model.name if cfg.needs_teacher else None,
                       rows=str(rows_file), config=cfg, output=str(work / "model"),
                       checkpoint_dir=str(work / "checkpoints"))  # fmt: skip
        run = launch_finetune(job, gpus, work / "launch", device_type=device.type, on_event=_log_event)
    student, tokenizer = load_model(str(work / "model"))
    return run.result, student, tokenizer


def training_gpus(device: torch.device) -> int:
    """`MHA2MLA_GPUS`: the processes a training stage spreads over, checked against this worker's CUDA devices."""
    gpus = context().settings.gpus
    if device.type == "cuda" and gpus > torch.cuda.device_count():
        raise ValueError(f"MHA2MLA_GPUS={gpus} but this worker has {torch.cuda.device_count()} CUDA devices; set it to "
                         f"at most {torch.cuda.device_count()}")  # fmt: skip
    return gpus


def _training_inputs(model: ModelSource, checkpoint: StageResult, rows: StageResult, device: torch.device,
                     with_teacher: bool, seq_len: int | None = None) -> tuple:  # fmt: skip
    """(teacher on `device` or None, a private copy of `checkpoint` on `device`, its tokenizer, rows (N, seq_len)):
    finetune-data's rows, or with `seq_len` the calibration sample's ids in whole windows of seq_len."""
    teacher = on_device(load_source(model)[0], device).float() if with_teacher else None  # fp32, as training takes it
    student, tokenizer = load_checkpoint(checkpoint, shared=False)
    tensors = load_tensors(rows)
    if seq_len is None:
        ids = tensors["rows"]
    else:
        flat = tensors["input_ids"]  # (N,)
        ids = flat[: flat.numel() // seq_len * seq_len].view(-1, seq_len)
    return teacher, student.to(device), tokenizer, ids.long()
