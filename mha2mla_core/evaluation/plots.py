"""PNG figures of evaluation results, as bytes. matplotlib is imported lazily and drawn on the Agg canvas
directly (no pyplot, no global backend switch)."""

from __future__ import annotations

import io
from typing import Any

from mha2mla_core.evaluation.needle import NeedleResult
from mha2mla_core.evaluation.report import EvalResult


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def needle_heatmap(result: NeedleResult, title: str) -> bytes:
    """Accuracy by context length (x) and needle depth (y), one cell per (length, depth)."""
    fig = _figure(1.2 + 1.1 * len(result.lengths), 1.0 + 0.5 * len(result.depths))
    ax = fig.add_subplot()
    grid = [[result.accuracy[i][j] for i in range(len(result.lengths))] for j in range(len(result.depths))]
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    for j, row in enumerate(grid):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _png(fig)


def decode_speed(results: dict[str, EvalResult]) -> bytes:
    """Decode tokens/s (explicit loop) against context length, one line per (model, batch size)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    for name, result in results.items():
        for batch in sorted({p.batch for p in result.inference}):
            points = sorted((p.context, p.decode_tok_s) for p in result.inference if p.batch == batch)
            ax.plot(*zip(*points), marker="o", label=f"{name} B={batch}")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="decode tokens/s", title="decode speed")
    ax.legend(fontsize=8)
    return _png(fig)


def kv_cache(results: dict[str, EvalResult]) -> bytes:
    """KV-cache bytes per token per sequence, one bar per model."""
    names = [n for n, r in results.items() if r.kv_bytes_per_token is not None]
    values = [results[n].kv_bytes_per_token for n in names]
    fig = _figure(1.5 + 1.2 * len(names), 4)
    ax = fig.add_subplot()
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, [f"{v:,.0f}" for v in values], fontsize=8)
    ax.set(ylabel="bytes / token", title="KV cache per token")
    ax.tick_params(axis="x", labelrotation=20)
    return _png(fig)
