"""Partial RoPE: choose which frequency pairs of each head keep their rotation.

Pair i of a head is the dims (i, i + D/2) in HF's rotate-half layout, rotating with frequency
base^(-2i/D): pair 0 is the highest frequency. Legend: N calibration tokens, H query heads,
Hkv KV heads, D head dim, P = rope_dims / 2 kept pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class RotatedRope:
    """Rotated partial RoPE (TransMLA's RoRoPE): ONE RoPE key shared by every query head.

    RoPE at frequency f turns pair f of every KV head by the same angle, so any mix of the KV heads' pair-f
    components (the same mix on both dims of the pair) commutes with it. Per frequency, component c of the KV heads
    is `key_mix[c] . k^f` (a 2-dim key shared by all query heads), and the queries of KV head g read it with weight
    `query_mix[c][g]`. With all Hkv components of a frequency, sum_c query_mix[c] key_mix[c]^T = I: the attention
    is unchanged. The mixes come from a per-frequency PCA of the keys across KV heads, weighted by how strongly the
    queries read each head, so that the first components carry most of the logits' key energy. Which slots are kept
    is `rotate_rope`'s choice: the first component of the fastest frequencies (the conversion's default), or the
    top (frequency, component) slots by a score (2-norm ranks unrotated pairs alike).

    pairs (P,), key_mix / query_mix (P, Hkv): the kept slots, ascending by (frequency, component).
    energy (D/2, Hkv): the score every (frequency, component) was ranked by (`rotate_rope`), descending per frequency.
    """

    pairs: torch.Tensor
    key_mix: torch.Tensor
    query_mix: torch.Tensor
    energy: torch.Tensor


def rotation_loss(inv_freq: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(D/2,) what dropping RoPE costs each frequency: the mean over the causal (query, key) pairs of a window of
    `seq_len` tokens of ||(R(theta * dist) - I) u||^2 = 2 (1 - cos(theta * dist)) for a unit pair u.

    Near 2 for the fast frequencies, near 0 for those that barely turn within the window (they lose little)."""
    dist = torch.arange(seq_len, dtype=torch.float64, device=inv_freq.device)  # (L,)
    pairs = seq_len - dist  # causal (query, key) pairs at each distance
    turn = 2 * (1 - torch.cos(inv_freq.double()[:, None] * dist[None]))  # (D/2, L)
    return (turn * pairs).sum(-1) / pairs.sum()


def rotate_rope(
    q: torch.Tensor, k: torch.Tensor, keep: int, position_loss: torch.Tensor | None = None, prefix: bool = False
) -> RotatedRope:
    """The rotation and the `keep` kept slots of one layer from pre-RoPE q (N, H, D) and k (N, Hkv, D).

    Per frequency f: C = E[k^f k^f^T] (Hkv, Hkv; both dims of the pair are samples, so C does not depend on the
    position) and w_g = E sum_{h in g} ||q_h^f||^2. The logit error of dropping a key direction is weighted by w,
    so the components are the eigenvectors u of W^1/2 C W^1/2: key_mix = W^1/2 u, query_mix = W^-1/2 u, and a
    component's eigenvalue is the query-weighted key energy it carries. Slots are ranked by that energy times
    `position_loss` (D/2,) when given (`rotation_loss`: what losing the rotation costs at that frequency), or, with
    `prefix`, are the first component of the `keep` fastest frequencies (one key with ordinary RoPE frequencies).
    """
    n, h, d = q.shape
    hkv, half = k.shape[1], d // 2
    if not 0 < keep <= (half if prefix else hkv * half):
        raise ValueError(f"keep={keep} slots must be in [1, {half if prefix else hkv * half}]")
    k1, k2 = k.double().chunk(2, dim=-1)  # (N, Hkv, D/2)
    moment = (torch.einsum("ngf,nhf->fgh", k1, k1) + torch.einsum("ngf,nhf->fgh", k2, k2)) / n  # (D/2, Hkv, Hkv)
    q_energy = pair_norms(q).double().square().view(n, hkv, h // hkv, half).sum(2).mean(0)  # (Hkv, D/2)
    weight = q_energy.T.clamp_min(q_energy.max() * 1e-9)  # (D/2, Hkv)
    root = weight.sqrt()
    evals, evecs = torch.linalg.eigh(root[:, :, None] * moment * root[:, None, :])  # ascending
    energy, evecs = evals.flip(-1).clamp_min(0), evecs.flip(-1)  # (D/2, Hkv), (D/2, Hkv, Hkv) columns = components
    score = energy if position_loss is None else energy * position_loss.to(energy)[:, None]
    if prefix:
        slots = torch.arange(keep, device=energy.device) * hkv  # component 0 of frequencies 0 .. keep-1
    else:
        slots = score.flatten().topk(keep).indices.sort().values  # (P,) = f * Hkv + c
    f, c = slots // hkv, slots % hkv
    u = evecs[f, :, c]  # (P, Hkv)
    return RotatedRope(pairs=f, key_mix=root[f] * u, query_mix=u / root[f], energy=score)
