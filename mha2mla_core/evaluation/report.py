"""One model's evaluation result, and the side-by-side table of several (markdown + JSON, deltas vs a baseline)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

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
    kv_bytes_per_token_probe: float | None = None  # from the cache after a forward of EvalConfig.kv_probe_tokens
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
            kv_bytes_per_token_probe=data.get("kv_bytes_per_token_probe"),
        )

    def to_markdown(self) -> str:
        return compare({self.name: self}).to_markdown()

    @property
    def kv_bytes_per_token(self) -> float | None:
        """Measured from the cache: after the probe forward where one ran, else after the inference stage's first
        prefill; else the model's own figure."""
        if self.kv_bytes_per_token_probe is not None:
            return self.kv_bytes_per_token_probe
        return self.inference[0].kv_bytes_per_token if self.inference else self.kv_bytes_per_token_reported


class Metric(NamedTuple):
    key: str  # stable name, also the MLflow metric name: "ppl", "mc.arc_easy.acc", "speed.b1_t512.decode_tok_s"
    label: str  # as the table shows it
    kind: str  # one of KINDS
    value: float
    stderr: float | None


def _headline(score: MCScore) -> float:
    """A task's figure in the six-task average, as the MHA2MLA paper reports it: acc_norm where lm-eval gives one
    (WinoGrande has none: acc)."""
    return score.acc if score.acc_norm is None else score.acc_norm


def commonsense_avg(scores: Mapping[str, MCScore]) -> float | None:
    """The six-task average in percent (each task's headline figure), or None unless all six were scored."""
    if not all(t in scores for t in COMMONSENSE):
        return None
    return 100 * sum(_headline(scores[t]) for t in COMMONSENSE) / len(COMMONSENSE)


def mc_summary(scores: Mapping[str, MCScore]) -> str:
    """One line of each task's headline figure in percent, and the six-task average when all six were scored."""
    parts = [f"{task} {100 * _headline(s):.1f}" for task, s in scores.items()]
    average = commonsense_avg(scores)
    return ", ".join(parts + ([] if average is None else [f"six-task average {average:.1f}"]))


def metrics_of(result: EvalResult) -> list[Metric]:
    """Each figure of the result, in table order; accuracies in percent."""
    rows: list[Metric] = []
    if result.perplexity:
        p = result.perplexity
        rows.append(Metric("ppl", f"PPL (window {p.window}, {p.predicted_tokens:,} tokens)", "ppl", p.ppl, None))
    for task, s in result.multiple_choice.items():
        rows.append(Metric(f"mc.{task}.acc", f"{task} acc", "acc", 100 * s.acc, _pct(s.acc_stderr)))
        if s.acc_norm is not None:
            norm = 100 * s.acc_norm
            rows.append(Metric(f"mc.{task}.acc_norm", f"{task} acc_norm", "acc", norm, _pct(s.acc_norm_stderr)))
    average = commonsense_avg(result.multiple_choice)
    if average is not None:
        rows.append(Metric("mc.commonsense_avg", "commonsense avg (6 tasks: acc_norm; WinoGrande acc)", "acc", average,
                           None))  # fmt: skip
    if result.needle:
        n = result.needle
        rows.append(Metric("needle.acc", "needle acc (all cells)", "acc", 100 * n.mean_accuracy, None))
        for length, row in zip(n.lengths, n.accuracy):
            accuracy = 100 * sum(row) / len(row)
            rows.append(Metric(f"needle.acc.len{length}", f"needle acc @ {length} tokens", "acc", accuracy, None))
    if result.kv_bytes_per_token is not None:
        rows.append(Metric("kv_bytes_per_token", "KV bytes/token", "bytes", result.kv_bytes_per_token, None))
    for p in result.inference:
        key, at = f"speed.b{p.batch}_t{p.context}", f"B={p.batch} T={p.context}"
        rows.append(Metric(f"{key}.prefill_tok_s", f"prefill tok/s {at}", "tok_s", p.prefill_tok_s, None))
        rows.append(Metric(f"{key}.decode_tok_s", f"decode tok/s {at}", "tok_s", p.decode_tok_s, None))
        rows.append(Metric(f"{key}.generate_tok_s", f"generate tok/s {at}", "tok_s", p.generate_tok_s, None))
        peak = p.peak_memory_bytes / 2**20
        rows.append(Metric(f"{key}.peak_mib", f"peak MiB ({p.memory_kind}) {at}", "mib", peak, None))
    return rows


def flat_metrics(result: EvalResult) -> dict[str, float]:
    """Every figure of the table by key (accuracies in percent), each stderr as KEY_stderr, and the counts and
    seconds behind them; the keys are valid MLflow metric names."""
    flat: dict[str, float] = {}
    for m in metrics_of(result):
        flat[m.key] = m.value
        if m.stderr is not None:
            flat[f"{m.key}_stderr"] = m.stderr
    if result.perplexity:
        flat.update(nll=result.perplexity.nll, predicted_tokens=result.perplexity.predicted_tokens)
    for task, score in result.multiple_choice.items():
        flat[f"mc.{task}.samples"] = score.samples
    for stage, seconds in result.seconds.items():
        flat[f"seconds.{stage}"] = seconds
    return flat


def _pct(stderr: float | None) -> float | None:
    return None if stderr is None else 100 * stderr


@dataclass(frozen=True)
class MetricRow:
    key: str  # Metric.key
    metric: str  # Metric.label
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Comparison:
        """The table back from `json.loads(to_json())`."""
        names = [f.name for f in fields(MetricRow)]
        rows = tuple(MetricRow(**{k: row[k] for k in names}) for row in data["rows"])
        return cls(data["baseline"], tuple(data["models"]), rows)

    def row(self, key: str) -> MetricRow:
        for row in self.rows:
            if row.key == key:
                return row
        raise KeyError(f"no metric {key!r} in the table; it has {[r.key for r in self.rows]}")

    def with_model(self, name: str, values: Mapping[str, float]) -> Comparison:
        """The table with one more column: `values` by metric key (other rows stay empty), deltas vs the baseline."""
        if name in self.models:
            raise ValueError(f"model {name!r} is already a column of the table {list(self.models)}")
        rows = []
        for r in self.rows:
            value = values.get(r.key)
            delta = _delta(r.kind, r.values[self.baseline], value)
            rows.append(MetricRow(r.key, r.metric, r.kind, {**r.values, name: value}, {**r.stderrs, name: None},
                                  {**r.deltas, name: delta}))  # fmt: skip
        return Comparison(self.baseline, (*self.models, name), tuple(rows))

    def cells(self) -> list[list[str]]:
        """The header (metric, then one column per model) and one row of formatted cells per metric."""
        body = [[row.metric] + [_cell(row, m, m == self.baseline) for m in self.models] for row in self.rows]
        return [["metric", *self.models], *body]

    def to_markdown(self) -> str:
        header, *body = self.cells()
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(self.models)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
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
        for m in metrics_of(result):
            entry = table.setdefault(m.key, {"label": m.label, "kind": m.kind, "values": {}, "stderrs": {}})
            entry["values"][name], entry["stderrs"][name] = m.value, m.stderr
    rows = []
    for key, entry in table.items():
        values = {name: entry["values"].get(name) for name in results}
        base = values[baseline]
        deltas = {name: _delta(entry["kind"], base, v) for name, v in values.items()}
        stderrs = {n: entry["stderrs"].get(n) for n in results}
        rows.append(MetricRow(key, entry["label"], entry["kind"], values, stderrs, deltas))
    return Comparison(baseline, tuple(results), tuple(rows))


def _delta(kind: str, base: float | None, value: float | None) -> float | None:
    if base is None or value is None:
        return None
    if KINDS[kind][1] == "pts":
        return value - base
    return 100 * (value / base - 1) if base else None
