"""Typed, frozen configs and results of the fine-tuning stage.

One optimizer step consumes `seq_len * micro_batch_size * grad_accum_steps * world_size` tokens (the global
batch); `max_tokens // that` is the number of steps. The learning rate follows WSD (warm-up, stable, decay):

    lr
    ^      ________________________
    |     /                        \\
    |    /                          \\
    |   /                            \\___ min_lr_ratio * lr
    +--|-------|-------------------|-----|--> step
       0  warmup_frac          1 - decay_frac  1      (fractions of the total steps)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Trainable = Literal["all", "attention", "attention+norms"]
_TRAINABLE = ("all", "attention", "attention+norms")
Strategy = Literal["auto", "ddp", "fsdp"]
_STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class FinetuneConfig:
    # budget and batch
    max_tokens: int = 20_000_000  # training tokens; the run takes max_tokens // tokens_per_step steps
    seq_len: int = 1024  # tokens per packed row
    micro_batch_size: int = 16  # rows per forward pass (per process)
    grad_accum_steps: int = 1  # forward passes per optimizer step
    # optimizer: AdamW (fused on CUDA) on fp32 master weights, global-norm clipping
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # WSD schedule (see the module docstring)
    warmup_frac: float = 0.02
    decay_frac: float = 0.2
    min_lr_ratio: float = 0.0
    # what trains: every weight, only the attention (params under `self_attn.`), or attention + norms
    trainable: Trainable = "all"
    # distillation: loss = kd_weight * T^2 KL(teacher_T || student_T) + (1 - kd_weight) * next-token CE;
    # kd_weight = 0 never runs the teacher (it may then be None)
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    # hidden-state distillation, added to the loss above: hidden_weight * the mean over decoder layers of the
    # relative MSE between the student's and the teacher's residual stream after the layer (needs the teacher)
    hidden_weight: float = 0.0
    # runtime
    bf16: bool = True  # bf16 autocast (+ FSDP bf16 params, fp32 reduce when distributed); False = fp32
    # several processes: ddp replicates the student (one gradient all-reduce a step), fsdp shards it per decoder
    # layer; auto = ddp where the training state (16 bytes a parameter) fits a quarter of a device, else fsdp
    strategy: Strategy = "auto"
    compile: bool = False  # torch.compile the student (and teacher)
    seed: int = 0  # data order
    log_every: int = 10  # steps between metric events (each one syncs the GPU)
    eval_every: int = 0  # steps between evaluate() calls; 0 = only at the end
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    # wall-clock minutes between checkpoints besides checkpoint_every, so that a killed run loses at most this much
    # training whatever a step costs; 0 = none (needs a checkpoint_dir, as every checkpoint does)
    checkpoint_minutes: float = 5.0
    keep_last: int = 2  # checkpoints kept in checkpoint_dir

    def __post_init__(self) -> None:
        _check_positive(self, "max_tokens", "seq_len", "micro_batch_size", "grad_accum_steps", "log_every", "keep_last")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2 (one next-token prediction)")
        if self.max_tokens < self.tokens_per_step(1):
            raise ValueError(
                f"max_tokens={self.max_tokens} is less than one optimizer step of seq_len*micro_batch_size*"
                f"grad_accum_steps={self.tokens_per_step(1)} tokens; raise max_tokens or shrink the batch"
            )
        _check_schedule(self.warmup_frac, self.decay_frac, self.min_lr_ratio)
        if self.strategy not in _STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; use one of {_STRATEGIES}")
        if self.trainable not in _TRAINABLE:
            raise ValueError(f"trainable={self.trainable!r}; use one of {_TRAINABLE}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight={self.kd_weight} must be in [0, 1] (0 = LM loss only, 1 = KD only)")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight={self.hidden_weight} must be >= 0 (0 = no hidden-state distillation)")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature={self.kd_temperature} must be > 0")
        if min(self.grad_clip, self.weight_decay, self.eval_every, self.checkpoint_every, self.checkpoint_minutes) < 0:
            raise ValueError(
                "grad_clip, weight_decay, eval_every, checkpoint_every and checkpoint_minutes must be >= 0")

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0

    def tokens_per_step(self, world_size: int) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps * world_size

    def total_steps(self, world_size: int) -> int:
        steps = self.max_tokens // self.tokens_per_step(world_size)
        if steps < 1:
            raise ValueError(
                f"max_tokens={self.max_tokens} is less than one optimizer step of {self.tokens_per_step(world_size)} "
                f"tokens on {world_size} processes; raise max_tokens or shrink the batch"
            )
        return steps


@dataclass(frozen=True)
class ReconstructConfig:
    """Block-wise reconstruction: each converted attention learns the original attention's output."""

    steps: int = 400  # optimizer steps (each one trains every layer on one micro-batch of rows)
    micro_batch_size: int = 8  # calibration rows per step
    lr: float = 1e-3
    warmup_frac: float = 0.05
    decay_frac: float = 0.5
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    bf16: bool = True
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        _check_positive(self, "steps", "micro_batch_size", "log_every")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        _check_schedule(self.warmup_frac, self.decay_frac, self.min_lr_ratio)
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be >= 0")


@dataclass(frozen=True)
class TrainEvent:
    """What a callback receives: `log` every `log_every` steps, `eval` after evaluate(), `checkpoint` after a save."""

    kind: Literal["log", "eval", "checkpoint"]
    step: int
    total_steps: int
    tokens: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    path: str | None = None


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    tokens: int
    final_loss: float
    tokens_per_s: float  # training throughput over the whole run (evaluation and checkpoint time excluded)
    seconds: float
    resumed_from_step: int | None
    last_checkpoint: str | None
    history: tuple[Mapping[str, float], ...]  # one entry per log / eval event


@dataclass(frozen=True)
class ReconstructResult:
    steps: int
    seconds: float
    rel_mse_before: tuple[float, ...]  # per layer: ||attn_student - attn_original||^2 / ||attn_original||^2
    rel_mse_after: tuple[float, ...]


def _check_positive(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1")


def _check_schedule(warmup_frac: float, decay_frac: float, min_lr_ratio: float) -> None:
    if not (0 <= warmup_frac <= 1 and 0 <= decay_frac <= 1 and warmup_frac + decay_frac <= 1):
        raise ValueError(
            f"warmup_frac={warmup_frac}, decay_frac={decay_frac}: each must be in [0, 1] and their sum <= 1"
        )
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
