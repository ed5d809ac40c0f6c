"""Partial RoPE: choose which frequency pairs of each head keep their rotation.

Pair i of a head is the dims (i, i + D/2) in HF's rotate-half layout, rotating with frequency
base^(-2i/D): pair 0 is the highest frequency. Legend: N calibration tokens, H query heads,
Hkv KV heads, D head dim, P = rope_dims / 2 kept pairs.
"""

from __future__ import annotations

import torch


def pair_norms(x: torch.Tensor) -> torch.Tensor:
    """(N, heads, D) -> (N, heads, D/2): the 2-norm of each rotate-half frequency pair."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.sqrt(x1.square() + x2.square())


def score_rope_pairs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """2-norm contribution of each frequency pair: mean over tokens of ||q_pair|| * ||k_pair||.

    q: (N, H, D), k: (N, Hkv, D) for one layer. Query heads of a group are summed onto their KV head.
    Returns (Hkv, D/2).
    """
    n, h, d = q.shape
    hkv = k.shape[1]
    qn = pair_norms(q).view(n, hkv, h // hkv, d // 2)  # (N, Hkv, n_rep, D/2)
    kn = pair_norms(k)  # (N, Hkv, D/2)
    return torch.einsum("ngrp,ngp->gp", qn, kn) / n  # (Hkv, D/2)


def select_rope_pairs(strategy: str, rope_dims: int, head_dim: int, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Kept pair indices for every KV head of one layer, sorted ascending: (Hkv, P).

    `high` keeps the highest frequencies, `low` the lowest, `uniform` pairs at equal intervals
    (starting with the highest), `2-norm` the top-P pairs by `scores` (Hkv, D/2).
    """
    n_pairs, keep = head_dim // 2, rope_dims // 2
    if strategy == "2-norm":
        if scores is None:
            raise ValueError("rope_strategy='2-norm' needs per-pair scores from calibration activations")
        return scores.topk(keep, dim=-1).indices.sort(dim=-1).values
    if strategy == "high":
        fixed = torch.arange(keep)
    elif strategy == "low":
        fixed = torch.arange(n_pairs - keep, n_pairs)
    elif strategy == "uniform":
        fixed = torch.arange(keep) * (n_pairs // keep)
    else:
        raise ValueError(f"rope_strategy={strategy!r} is unknown; use 'high', 'low', 'uniform' or '2-norm'")
    hkv = 1 if scores is None else scores.shape[0]
    return fixed.expand(hkv, keep).clone()


def rope_and_nope_dims(pairs: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each KV head: dim indices in the new order [rope (Dr) | nope (D - Dr)]. pairs (Hkv, P).

    Returns rope_dims (Hkv, Dr) = [pairs, pairs + D/2] and nope_dims (Hkv, D - Dr) ascending.
    """
    rope = torch.cat([pairs, pairs + head_dim // 2], dim=-1)  # (Hkv, Dr)
    keep = torch.ones(pairs.shape[0], head_dim, dtype=torch.bool)
    keep.scatter_(1, rope, False)
    nope = torch.stack([torch.nonzero(row).squeeze(-1) for row in keep])  # (Hkv, D - Dr)
    return rope, nope
