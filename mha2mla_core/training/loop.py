"""Fine-tuning stage: recover a converted (MLA) student by distilling the original model into it.

    rows = pack_texts(tokenizer, load_texts("../shared/data/text_train"), cfg.seq_len)    # (N, T) token ids
    result = finetune(student, teacher, rows, FinetuneConfig(max_tokens=20_000_000), checkpoint_dir="ckpt")

One optimizer step: for each of `grad_accum_steps` micro-batches of (B, T) rows, the student's logits
(B, T, V) and, when kd_weight or hidden_weight > 0, the teacher's (no grad, eval mode, bf16 autocast) go into
`distill_loss`; then clip the global grad norm, AdamW, and set the WSD learning rate of the next step.
The caller places both models on the device; with a process group initialised (torchrun / accelerate
launch) the student is replicated (DDP) or sharded (FSDP), per `cfg.strategy`, and each rank reads its own slice
of every global batch, so one step sees the same rows whatever the number of processes.

Resuming: with `checkpoint_dir` holding checkpoints, the newest readable one is loaded (model, optimizer,
step, data position, RNG, loss history) and the run continues exactly where it stopped. The student's
architecture, the data and the batch geometry must match the checkpoint's; this is checked before the
first step, and checkpoints are only ever added or pruned after a successful save.

Core never prints: metrics go to `callbacks` (TrainEvent), the library logger gets a line per log event.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mha2mla_core.training.checkpoint import Checkpoint, load_latest_checkpoint, save_checkpoint
from mha2mla_core.training.config import FinetuneConfig, FinetuneResult, TrainEvent
from mha2mla_core.training.distributed import (
    World, all_reduce_max, all_reduce_sum, barrier, current_world, gradient_sync, wrap_model,
)
from mha2mla_core.training.losses import distill_loss, hidden_state_loss
from mha2mla_core.training.packing import RowOrder, fingerprint_rows, pack_texts
from mha2mla_core.training.params import check_not_shared, set_trainable, trainable_names
from mha2mla_core.training.schedule import wsd_lr

__all__ = ["FinetuneConfig", "FinetuneResult", "TrainEvent", "finetune", "pack_texts", "set_trainable"]

logger = logging.getLogger(__name__)

Callback = Callable[[TrainEvent], None]
Evaluate = Callable[[nn.Module], Mapping[str, float]]

# config fields that fix which rows each step reads and which weights train: a resume must keep them
_TRAJECTORY_FIELDS = ("seq_len", "micro_batch_size", "grad_accum_steps", "trainable", "seed")


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    rows: torch.Tensor,
    cfg: FinetuneConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    evaluate: Evaluate | None = None,
) -> FinetuneResult:
    """Train `student` in place on packed `rows` (N, cfg.seq_len); see the module docstring.

    `evaluate(model) -> {name: value}` runs every `cfg.eval_every` steps and at the end (on every rank).
    Sets `requires_grad` on the student's parameters per `cfg.trainable`; puts the teacher in eval mode.
    """
    world = current_world()
    cfg.total_steps(world.size)  # raises if the budget is less than one step
    _check_inputs(student, teacher, rows, cfg)
    arch = architecture_of(student)
    data_id = fingerprint_rows(rows)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resume = load_latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if resume is not None:
        _check_resumable(resume, arch, data_id, cfg, world)
    set_trainable(student, cfg.trainable)
    model = wrap_model(student, cfg.strategy, cfg.bf16) if world.size > 1 else student
    trainer = _Trainer(model, teacher, rows, cfg, world, meta={"arch": arch, "data_id": data_id})
    if resume is not None:
        trainer.restore(resume)
    return trainer.train(ckpt_dir, callbacks, evaluate)


def architecture_of(model: nn.Module) -> dict:
    """model_type and every state-dict tensor's shape: what a checkpoint must match to be resumed into it."""
    config = getattr(model, "config", None)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"model_type": getattr(config, "model_type", type(model).__name__), "shapes": shapes}


def _check_inputs(student: nn.Module, teacher: nn.Module | None, rows: torch.Tensor, cfg: FinetuneConfig) -> None:
    if rows.ndim != 2 or rows.shape[1] != cfg.seq_len or rows.dtype.is_floating_point:
        raise ValueError(
            f"rows must be integer token ids of shape (N, seq_len={cfg.seq_len}); got {tuple(rows.shape)} "
            f"{rows.dtype}; build them with pack_texts(tokenizer, texts, cfg.seq_len)"
        )
    vocab = student.get_output_embeddings().weight.shape[0]
    if int(rows.max()) >= vocab or int(rows.min()) < 0:
        raise ValueError(f"rows hold token ids in [{int(rows.min())}, {int(rows.max())}], outside the vocab of {vocab}")
    if cfg.needs_teacher:
        if teacher is None:
            raise ValueError(f"distillation (kd_weight={cfg.kd_weight}, hidden_weight={cfg.hidden_weight}) needs a "
                             f"teacher; pass the original model or set both to 0")
        t_vocab = teacher.get_output_embeddings().weight.shape[0]
        if t_vocab != vocab:
            raise ValueError(f"teacher vocab {t_vocab} != student vocab {vocab}: distillation needs the same tokenizer")
        check_not_shared(student, teacher, trainable_names(student, cfg.trainable))


def _check_resumable(ckpt: Checkpoint, arch: dict, data_id: str, cfg: FinetuneConfig, world: World) -> None:
    state = ckpt.trainer_state
    if state["arch"] != arch:
        raise ValueError(
            f"checkpoint {ckpt.path} holds a {state['arch']['model_type']} model with a different architecture "
            f"than this {arch['model_type']} student ({_first_differences(state['arch']['shapes'], arch['shapes'])}); "
            f"resume with the student it was written for, or use a fresh checkpoint_dir"
        )
    if state["data_id"] != data_id:
        raise ValueError(
            f"checkpoint {ckpt.path} was trained on rows {state['data_id']}, these rows are {data_id}; "
            f"resume with the same data (texts, tokenizer, seq_len) or use a fresh checkpoint_dir"
        )
    saved = state["config"]
    changed = {k: (saved[k], getattr(cfg, k)) for k in _TRAJECTORY_FIELDS if saved[k] != getattr(cfg, k)}
    if state["world_size"] != world.size:
        changed["world_size"] = (state["world_size"], world.size)
    if changed:
        raise ValueError(f"checkpoint {ckpt.path} was written with other settings (saved, now): {changed}; "
                         f"keep them to resume, or use a fresh checkpoint_dir")
    other = [f.name for f in fields(cfg) if _jsonable(getattr(cfg, f.name)) != saved.get(f.name)]
    if other:
        logger.warning("resuming %s with changed settings %s", ckpt.path, other)


def _first_differences(saved: dict, now: dict, limit: int = 3) -> str:
    diffs = [f"{k}: missing here" for k in saved if k not in now]
    diffs += [f"{k}: not in checkpoint" for k in now if k not in saved]
    diffs += [f"{k}: {saved[k]} vs {now[k]}" for k in saved if k in now and saved[k] != now[k]]
    return "; ".join(diffs[:limit]) + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


class _Trainer:
    """The loop's state: step, metric window, history; one method per thing a step does."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, rows: torch.Tensor, cfg: FinetuneConfig,
                 world: World, meta: dict) -> None:
        self.model, self.rows, self.cfg, self.world = model, rows, cfg, world
        self.device = next(model.parameters()).device
        self.total_steps = cfg.total_steps(world.size)
        self.tokens_per_step = cfg.tokens_per_step(world.size)
        self.order = RowOrder(rows.shape[0], cfg.seed)
        self.teacher = teacher.eval() if teacher is not None and cfg.needs_teacher else None
        self.forward = torch.compile(model) if cfg.compile else model
        self.teacher_forward = torch.compile(self.teacher) if cfg.compile and self.teacher else self.teacher
        self.optimizer = _make_optimizer(model, cfg, self.device)
        self.step, self.history, self.resumed_from, self.meta = 0, [], None, meta  # meta: saved in checkpoints
        self.window = torch.zeros(4, dtype=torch.float64, device=self.device)  # summed loss, lm, kd, hidden
        self.window_micro_steps, self.train_seconds = 0, 0.0  # train_seconds: this process's, for throughput

    def train(self, ckpt_dir: Path | None, callbacks: Sequence[Callback], evaluate: Evaluate | None):
        cfg, last_path = self.cfg, None
        self.model.train()
        started = window_start = last_saved = time.perf_counter()
        sigterm = _SigtermCheckpoint(enabled=ckpt_dir is not None)
        try:
            while self.step < self.total_steps:
                grad_norm = self._optimizer_step()
                self.step += 1
                last = self.step == self.total_steps
                if self.step % cfg.log_every == 0 or last:
                    seconds = time.perf_counter() - window_start
                    self.train_seconds += seconds
                    self._emit(callbacks, "log", self._log_metrics(grad_norm, seconds))
                    window_start = time.perf_counter()
                paused = time.perf_counter()  # evaluation and checkpoint time is left out of the throughput
                if evaluate is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
                    self._emit(callbacks, "eval", self._evaluate(evaluate))
                if ckpt_dir is not None:
                    save, stop = self._checkpoint_due(last_saved, sigterm.requested, last)
                    if save:
                        last_path = self._checkpoint(ckpt_dir)
                        last_saved = time.perf_counter()
                        self._emit(callbacks, "checkpoint", {}, str(last_path))
                    if stop:
                        sigterm.pass_on(self.step)
                window_start += time.perf_counter() - paused
        finally:
            sigterm.restore()
        return self._result(time.perf_counter() - started, last_path)

    def _checkpoint_due(self, last_saved: float, sigterm: bool, last: bool) -> tuple[bool, bool]:
        """(save now, stop after saving): at the last step, every `checkpoint_every` steps, and at a log step (which
        syncs anyway) once `checkpoint_minutes` have passed since the last save by rank 0's clock, or when any rank
        got SIGTERM. All ranks decide together, so that they enter the collective save and stop at the same step."""
        cfg = self.cfg
        every = last or (bool(cfg.checkpoint_every) and self.step % cfg.checkpoint_every == 0)
        if self.step % cfg.log_every and not last:
            return every, False
        timed = (bool(cfg.checkpoint_minutes) and self.world.is_main
                 and time.perf_counter() - last_saved >= 60 * cfg.checkpoint_minutes)  # fmt: skip
        if self.world.size > 1:
            flags = all_reduce_max(torch.tensor([float(timed), float(sigterm)], device=self.device), self.world)
            timed, sigterm = bool(flags[0]), bool(flags[1])
        return every or timed or sigterm, sigterm

    def _optimizer_step(self) -> float:
        cfg, lr = self.cfg, wsd_lr(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        base = self.step * self.tokens_per_step // cfg.seq_len  # first global row position of this step
        for k in range(cfg.grad_accum_steps):
            start = base + (k * self.world.size + self.world.rank) * cfg.micro_batch_size
            ids = self.rows[self.order.rows(start, cfg.micro_batch_size)]
            if self.device.type == "cuda":  # a copy from pageable memory waits for the GPU's queue to drain first
                ids = ids.pin_memory()
            ids = ids.to(self.device, non_blocking=True)
            with gradient_sync(self.model, k == cfg.grad_accum_steps - 1):
                self.window += self._micro_step(ids)
            self.window_micro_steps += 1
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _micro_step(self, ids: torch.Tensor) -> torch.Tensor:
        """Forward + backward of one (B, T) micro-batch; returns (loss, lm_loss, kd_loss, hidden_loss) detached."""
        cfg, hidden = self.cfg, self.cfg.hidden_weight > 0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            out = self.forward(input_ids=ids, use_cache=False, output_hidden_states=hidden)  # logits (B, T, V)
            target = None
            if self.teacher is not None:
                with torch.no_grad():
                    target = self.teacher_forward(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        loss, lm, kd = distill_loss(out.logits, target.logits if target is not None else None, ids, cfg.kd_weight,
                                    cfg.kd_temperature, compiled=cfg.compile)
        hidden_loss = torch.zeros_like(lm)
        if hidden:
            hidden_loss = hidden_state_loss(out.hidden_states[1:], target.hidden_states[1:])
            loss = loss + cfg.hidden_weight * hidden_loss
        (loss / cfg.grad_accum_steps).backward()
        return torch.stack([loss.detach(), lm, kd, hidden_loss.detach()]).to(torch.float64)

    def _log_metrics(self, grad_norm, seconds: float) -> dict[str, float]:
        window = all_reduce_sum(self.window.clone(), self.world) / (self.window_micro_steps * self.world.size)
        tokens = self.window_micro_steps * self.cfg.micro_batch_size * self.cfg.seq_len * self.world.size
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        loss, lm, kd, hidden = window.tolist()
        metrics = {"loss": loss, "lm_loss": lm, "lr": wsd_lr(self.step - 1, self.total_steps, self.cfg),
                   "grad_norm": float(norm), "tokens_per_s": tokens / max(seconds, 1e-9)}
        if self.teacher is not None:
            metrics["kd_loss"] = kd
        if self.cfg.hidden_weight > 0:
            metrics["hidden_loss"] = hidden
        self.window.zero_()
        self.window_micro_steps = 0
        return metrics

    def _evaluate(self, evaluate: Evaluate) -> dict[str, float]:
        self.model.eval()
        metrics = dict(evaluate(self.model))
        self.model.train()
        return metrics

    def _emit(self, callbacks: Sequence[Callback], kind: str, metrics: dict, path: str | None = None) -> None:
        tokens = self.step * self.tokens_per_step
        if metrics:
            self.history.append({"kind": kind, "step": self.step, "tokens": tokens, **metrics})
            if kind == "log":
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", self.step, self.total_steps,
                            metrics["loss"], metrics["lr"], metrics["tokens_per_s"],
                            extra={"completed": self.step, "total": self.total_steps})  # a progress display's count
        if self.world.is_main:
            event = TrainEvent(kind, self.step, self.total_steps, tokens, metrics, path)
            for callback in callbacks:
                callback(event)

    def _checkpoint(self, ckpt_dir: Path) -> Path:
        model_state, optim_state = get_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        path = ckpt_dir / f"step-{self.step:08d}"
        if self.world.is_main:
            trainer_state = {
                "step": self.step, "data_position": self.step * self.tokens_per_step // self.cfg.seq_len,
                "optimizer": optim_state, "rng": _rng_state(), "config": {k: _jsonable(v) for k, v in
                                                                          asdict(self.cfg).items()},
                "world_size": self.world.size, **self.meta,
            }
            path = save_checkpoint(ckpt_dir, self.step, Checkpoint(path, model_state, trainer_state, self.history),
                                   self.cfg.keep_last)
        barrier(self.world)
        return path

    def restore(self, ckpt: Checkpoint) -> None:
        state = ckpt.trainer_state
        set_state_dict(self.model, self.optimizer, model_state_dict=ckpt.model_state,
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        self.step, self.history, self.resumed_from = state["step"], ckpt.history, state["step"]
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", ckpt.path, self.step)

    def _result(self, seconds: float, last_path: Path | None) -> FinetuneResult:
        logs = [h for h in self.history if h["kind"] == "log"]
        trained = (self.step - (self.resumed_from or 0)) * self.tokens_per_step
        return FinetuneResult(
            steps=self.step, tokens=self.step * self.tokens_per_step,
            final_loss=logs[-1]["loss"] if logs else math.nan,
            tokens_per_s=trained / max(self.train_seconds, 1e-9), seconds=seconds,
            resumed_from_step=self.resumed_from, last_checkpoint=str(last_path) if last_path else None,
            history=tuple(self.history),
        )


class _SigtermCheckpoint:
    """While a run with a checkpoint_dir trains in the main thread (a torchrun worker, a script), SIGTERM asks for a
    checkpoint at the next log step; after it, the signal goes on to the handler that was there before (by default:
    the process ends), so a stopped run resumes from where it stopped. In another thread nothing is installed (Python
    only lets the main thread handle signals); `checkpoint_minutes` bounds the loss there."""

    def __init__(self, enabled: bool) -> None:
        self.requested, self.installed, self.previous = False, False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._request)
            self.installed = True

    def _request(self, signum, frame) -> None:
        self.requested = True
        logger.warning("SIGTERM: saving a checkpoint at the next log step, then stopping")

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
            self.installed = False

    def pass_on(self, step: int) -> None:
        self.restore()
        os.kill(os.getpid(), signal.SIGTERM)  # the previous handler runs now; by default the process ends here
        raise InterruptedError(f"training stopped by SIGTERM after the checkpoint at step {step}")


def _make_optimizer(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=device.type == "cuda")


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
