"""The WSD learning-rate schedule: linear warm-up, a stable plateau, a linear decay (see `config.py`)."""

from __future__ import annotations

from typing import Protocol


class _Schedule(Protocol):
    lr: float
    warmup_frac: float
    decay_frac: float
    min_lr_ratio: float


def wsd_lr(step: int, total_steps: int, cfg: _Schedule) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    warmup = round(cfg.warmup_frac * total_steps)
    decay = round(cfg.decay_frac * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_start = total_steps - decay
    if step >= decay_start:
        progress = (step - decay_start + 1) / decay  # in (0, 1]; the last step reaches min_lr_ratio * lr
        return cfg.lr * (1.0 - (1.0 - cfg.min_lr_ratio) * progress)
    return cfg.lr
