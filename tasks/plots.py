"""PNG figures of the conversion stages: each a `matplotlib.figure.Figure` drawn on its own Agg canvas, so no
backend or pyplot state of the process is touched (no display needed)."""

from __future__ import annotations

import io

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def rope_heatmap(scores: torch.Tensor) -> bytes:
    """2-norm scores (layers, Hkv, D/2) as one heatmap: rows = layers, columns = (KV head, pair)."""
    layers, heads, pairs = scores.shape
    grid = (scores / scores.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(layers, heads * pairs)
    fig = _figure((max(6, heads * pairs / 10), max(3, layers / 5)))
    ax = fig.subplots()
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for h in range(1, heads):
        ax.axvline(h * pairs - 0.5, color="white", linewidth=0.8)
    ax.set(xlabel=f"KV head x frequency pair ({heads} x {pairs})", ylabel="layer", title="RoPE pair 2-norm score")
    fig.colorbar(image, ax=ax, label="score / max of the head")
    return _png(fig)


def svd_spectrum(spectra: list[torch.Tensor], kept: int | None) -> bytes:
    """Normalised singular values of each layer's K_nope/V rows (log scale), the kept rank marked."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    colors = colormaps["viridis"](torch.linspace(0, 1, len(spectra)).numpy())
    for i, values in enumerate(spectra):
        ax.semilogy((values / values[0]).numpy(), color=colors[i], linewidth=0.8, label=f"layer {i}" if i in (0, len(spectra) - 1) else None)
    if kept is not None:
        ax.axvline(kept - 0.5, color="red", linestyle="--", label=f"kept rank {kept}")
    ax.set(xlabel="singular value index", ylabel="sigma / sigma_max", title="K_nope/V spectrum per layer")
    ax.legend(fontsize=8)
    return _png(fig)
