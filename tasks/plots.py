"""PNG figures of the conversion stages (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def rope_heatmap(scores: torch.Tensor) -> bytes:
    """2-norm scores (layers, Hkv, D/2) as one heatmap: rows = layers, columns = (KV head, pair)."""
    layers, heads, pairs = scores.shape
    grid = (scores / scores.amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(layers, heads * pairs)
    fig, ax = plt.subplots(figsize=(max(6, heads * pairs / 10), max(3, layers / 5)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for h in range(1, heads):
        ax.axvline(h * pairs - 0.5, color="white", linewidth=0.8)
    ax.set(xlabel=f"KV head x frequency pair ({heads} x {pairs})", ylabel="layer", title="RoPE pair 2-norm score")
    fig.colorbar(image, ax=ax, label="score / max of the head")
    return _png(fig)


def svd_spectrum(spectra: list[torch.Tensor], kept: int | None) -> bytes:
    """Normalised singular values of each layer's K_nope/V rows (log scale), the kept rank marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.cm.viridis(torch.linspace(0, 1, len(spectra)).numpy())
    for i, values in enumerate(spectra):
        ax.semilogy((values / values[0]).numpy(), color=colors[i], linewidth=0.8, label=f"layer {i}" if i in (0, len(spectra) - 1) else None)
    if kept is not None:
        ax.axvline(kept - 0.5, color="red", linestyle="--", label=f"kept rank {kept}")
    ax.set(xlabel="singular value index", ylabel="sigma / sigma_max", title="K_nope/V spectrum per layer")
    ax.legend(fontsize=8)
    return _png(fig)
