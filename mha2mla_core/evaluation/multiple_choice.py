"""Zero-shot multiple choice through lm-evaluation-harness, on local data or on the hub.

`source="local"` runs our lm-eval tasks (`mha2mla_core/lm_eval_tasks/mha2mla_*.yaml`, lm-eval's own prompts over
the normalized JSONL files of `shared/data/mc`); `source="hub"` runs the upstream lm-eval tasks of the same
names (`arc_easy`, ..., `mmlu`), for users with hub access. Either way the model is scored by lm-eval's `HFLM`
wrapped around the model instance, so any HF causal LM works, MLA models included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mha2mla_core.evaluation.paths import MC_DATA_DIR

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent.parent / "lm_eval_tasks"
LOCAL_PREFIX = "mha2mla_"
# short name (= the upstream lm-eval task or group) -> local data file
TASK_FILES = {
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "hellaswag": "hellaswag.jsonl",
    "piqa": "piqa.jsonl",
    "openbookqa": "openbookqa.jsonl",
    "winogrande": "winogrande.jsonl",
    "mmlu": "mmlu.jsonl",
}
SOURCES = ("local", "hub")


@dataclass(frozen=True)
class MCConfig:
    """Which tasks, on which data; task names are short (`arc_easy`) or local (`mha2mla_arc_easy`)."""

    tasks: tuple[str, ...] = tuple(TASK_FILES)
    data_dir: Path = field(default=MC_DATA_DIR)  # the normalized JSONL files (source="local")
    source: Literal["local", "hub"] = "local"
    limit: int | None = None  # at most this many items per task (per subject for MMLU); None = all
    batch_size: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(short_task_name(t) for t in self.tasks))
        if not self.tasks:
            raise ValueError(f"no task given; choose from {sorted(TASK_FILES)}")
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r} is unknown; use one of {SOURCES}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)):
            raise ValueError(f"limit={self.limit!r} must be a positive number of items per task, or None for all")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit={self.limit} must be >= 1 item per task, or None for all")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    def lm_eval_name(self, task: str) -> str:
        return task if self.source == "hub" else LOCAL_PREFIX + task


@dataclass(frozen=True)
class MCScore:
    """lm-eval's metrics for one task or group. acc_norm is None where lm-eval has none (WinoGrande, MMLU); a
    stderr is None where lm-eval reports none (N/A, e.g. for a single item)."""

    task: str
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int


def short_task_name(name: str) -> str:
    short = name.removeprefix(LOCAL_PREFIX)
    if short not in TASK_FILES:
        known = ", ".join(sorted(TASK_FILES))
        raise ValueError(f"unknown multiple-choice task {name!r}; known: {known} (or with the prefix {LOCAL_PREFIX})")
    return short


def check_mc_data(cfg: MCConfig) -> None:
    """Raise before any model work if a local data file is missing."""
    if cfg.source != "local":
        return
    for task in cfg.tasks:
        path = Path(cfg.data_dir) / TASK_FILES[task]
        if not path.is_file():
            raise FileNotFoundError(
                f"data file for task {task!r} not found: {path}; point --mc-data-dir (MCConfig.data_dir) at the "
                f"directory of the normalized MC files (shared/data/mc), or use --mc-source hub"
            )


def run_multiple_choice(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: MCConfig
) -> dict[str, MCScore]:
    """Score the model on cfg.tasks with lm_eval.simple_evaluate; keys are the short task names."""
    check_mc_data(cfg)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if cfg.source == "local":
        manager = TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False, metadata={"mc_data_dir": str(cfg.data_dir)}
        )
    else:
        manager = TaskManager()
    # backend="causal": HFLM would otherwise guess from config.model_type, which it does not know for MLA models
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=cfg.batch_size)
    names = [cfg.lm_eval_name(t) for t in cfg.tasks]
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=cfg.limit, log_samples=False)
    return {t: _score(t, cfg.lm_eval_name(t), out) for t in cfg.tasks}


def _score(task: str, name: str, out: dict[str, Any]) -> MCScore:
    metrics = out["results"][name]
    return MCScore(
        task=task,
        acc=float(metrics["acc,none"]),
        acc_stderr=_number(metrics.get("acc_stderr,none")),
        acc_norm=_number(metrics.get("acc_norm,none")),
        acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")),
        samples=sum(out["n-samples"][leaf]["effective"] for leaf in _leaf_tasks(name, out.get("group_subtasks", {}))),
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _leaf_tasks(name: str, children: dict[str, list[str]]) -> list[str]:
    if name not in children:
        return [name]
    return [leaf for child in children[name] for leaf in _leaf_tasks(child, children)]
