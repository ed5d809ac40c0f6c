"""One model's evaluation result, and the side-by-side table of several (markdown + JSON, deltas vs a baseline)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mha2mla_core.evaluation.inference import InferencePoint
from mha2mla_core.evaluation.multiple_choice import MCScore
from mha2mla_core.evaluation.needle import NeedleResult, NeedleTrial
from mha2mla_core.evaluation.perplexity import PerplexityResult

COMMONSENSE = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "winogrande")
# kind -> (how a value is shown, how its delta is measured)
KINDS = {
    "ppl": ("{:.2f}", "%"),
    "acc": ("{:.1f}", "pts"),  # percent
    "bytes": ("{:,.0f}", "%"),
    "tok_s": ("{:,.1f}", "%"),
    "mib": ("{:,.1f}", "%"),
}


@dataclass(frozen=True)
class EvalResult:
    """Everything measured on one model; stages that were not run stay None / empty."""

    name: str
    model_type: str
    parameters: int
    dtype: str
    device: str
    perplexity: PerplexityResult | None = None
    multiple_choice: dict[str, MCScore] = field(default_factory=dict)
    needle: NeedleResult | None = None
    inference: tuple[InferencePoint, ...] = ()
    kv_bytes_per_token_reported: float | None = None  # the model's own figure (MLA models), for a cross-check
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        data = json.loads(text)
        needle = data["needle"]
        return cls(
            **{k: data[k] for k in ("name", "model_type", "parameters", "dtype", "device", "seconds")},
            perplexity=PerplexityResult(**data["perplexity"]) if data["perplexity"] else None,
            multiple_choice={k: MCScore(**v) for k, v in data["multiple_choice"].items()},
            needle=None
            if needle is None
            else NeedleResult(
                lengths=tuple(needle["lengths"]),
                depths=tuple(needle["depths"]),
                accuracy=tuple(tuple(row) for row in needle["accuracy"]),
                trials=tuple(NeedleTrial(**t) for t in needle["trials"]),
            ),
            inference=tuple(InferencePoint(**p) for p in data["inference"]),
            kv_bytes_per_token_reported=data["kv_bytes_per_token_reported"],
        )

    def to_markdown(self) -> str:
        return compare({self.name: self}).to_markdown()

    @property
    def kv_bytes_per_token(self) -> float | None:
        """Measured from the cache after prefill where the inference stage ran, else the model's own figure."""
        return self.inference[0].kv_bytes_per_token if self.inference else self.kv_bytes_per_token_reported


def metrics_of(result: EvalResult) -> list[tuple[str, str, float, float | None]]:
    """(label, kind, value, stderr) for each figure of the result, in table order; accuracies in percent."""
    rows: list[tuple[str, str, float, float | None]] = []
    if result.perplexity:
        p = result.perplexity
        rows.append((f"PPL (window {p.window}, {p.predicted_tokens:,} tokens)", "ppl", p.ppl, None))
    for task, s in result.multiple_choice.items():
        rows.append((f"{task} acc", "acc", 100 * s.acc, _pct(s.acc_stderr)))
        if s.acc_norm is not None:
            rows.append((f"{task} acc_norm", "acc", 100 * s.acc_norm, _pct(s.acc_norm_stderr)))
    common = [result.multiple_choice[t].acc for t in COMMONSENSE if t in result.multiple_choice]
    if len(common) == len(COMMONSENSE):
        rows.append(("commonsense avg acc (6 tasks)", "acc", 100 * sum(common) / len(common), None))
    if result.needle:
        n = result.needle
        rows.append(("needle acc (all cells)", "acc", 100 * n.mean_accuracy, None))
        for length, row in zip(n.lengths, n.accuracy):
            rows.append((f"needle acc @ {length} tokens", "acc", 100 * sum(row) / len(row), None))
    if result.kv_bytes_per_token is not None:
        rows.append(("KV bytes/token", "bytes", result.kv_bytes_per_token, None))
    for p in result.inference:
        at = f"B={p.batch} T={p.context}"
        rows.append((f"prefill tok/s {at}", "tok_s", p.prefill_tok_s, None))
        rows.append((f"decode tok/s {at}", "tok_s", p.decode_tok_s, None))
        rows.append((f"generate tok/s {at}", "tok_s", p.generate_tok_s, None))
        rows.append((f"peak MiB ({p.memory_kind}) {at}", "mib", p.peak_memory_bytes / 2**20, None))
    return rows


def _pct(stderr: float | None) -> float | None:
    return None if stderr is None else 100 * stderr


@dataclass(frozen=True)
class MetricRow:
    metric: str
    kind: str
    values: dict[str, float | None]
    stderrs: dict[str, float | None]
    deltas: dict[str, float | None]  # vs the baseline: percent change ("%") or difference in points ("pts")

    @property
    def delta_unit(self) -> str:
        return KINDS[self.kind][1]


@dataclass(frozen=True)
class Comparison:
    baseline: str
    models: tuple[str, ...]
    rows: tuple[MetricRow, ...]

    def to_json(self) -> str:
        rows = [{**asdict(r), "delta_unit": r.delta_unit} for r in self.rows]
        return json.dumps({"baseline": self.baseline, "models": list(self.models), "rows": rows}, indent=2)

    def to_markdown(self) -> str:
        lines = [
            "| metric | " + " | ".join(self.models) + " |",
            "|---|" + "---:|" * len(self.models),
        ]
        for row in self.rows:
            cells = [_cell(row, model, model == self.baseline) for model in self.models]
            lines.append(f"| {row.metric} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def _cell(row: MetricRow, model: str, is_baseline: bool) -> str:
    value = row.values[model]
    if value is None:
        return "-"
    shown = KINDS[row.kind][0].format(value)
    if row.stderrs[model] is not None:
        shown += f" ± {row.stderrs[model]:.1f}"
    delta = row.deltas[model]
    if not is_baseline and delta is not None:
        shown += f" ({delta:+.1f}%)" if row.delta_unit == "%" else f" ({delta:+.1f})"
    return shown


def compare(results: dict[str, EvalResult], baseline: str | None = None) -> Comparison:
    """The side-by-side table of `results` (name -> result), deltas against `baseline` (default: the first)."""
    if not results:
        raise ValueError("compare needs at least one result")
    baseline = next(iter(results)) if baseline is None else baseline
    if baseline not in results:
        raise ValueError(f"baseline={baseline!r} is not one of the results {list(results)}")
    table: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        for label, kind, value, stderr in metrics_of(result):
            entry = table.setdefault(label, {"kind": kind, "values": {}, "stderrs": {}})
            entry["values"][name], entry["stderrs"][name] = value, stderr
    rows = []
    for label, entry in table.items():
        values = {name: entry["values"].get(name) for name in results}
        base = values[baseline]
        deltas = {name: _delta(entry["kind"], base, v) for name, v in values.items()}
        rows.append(MetricRow(label, entry["kind"], values, {n: entry["stderrs"].get(n) for n in results}, deltas))
    return Comparison(baseline, tuple(results), tuple(rows))


def _delta(kind: str, base: float | None, value: float | None) -> float | None:
    if base is None or value is None:
        return None
    if KINDS[kind][1] == "pts":
        return value - base
    return 100 * (value / base - 1) if base else None
