"""Low-rank initialisation of the latent: factor the non-RoPE key rows and the value rows of each
latent group into down (kv_a_proj) and up (kv_b_proj) projections.

Legend: Hkv KV heads, Hc latent groups, G = Hkv / Hc heads per group, Dn non-RoPE key dims, D head dim,
Rc latent dims per group, E hidden size. Up-projection rows are laid out per KV head as [k_nope | v].
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@functools.cache
def _mkl_thread_local_count() -> Callable[[int], int] | None:
    """MKL's `mkl_set_num_threads_local` (C name `MKL_Set_Num_Threads_Local`) from torch's own MKL: the MKL thread
    count of the calling thread only (0 = back to the process's), returning the previous one. None where torch's
    BLAS/LAPACK is not MKL or does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        set_local = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    set_local.argtypes, set_local.restype = [ctypes.c_int], ctypes.c_int
    return set_local


@contextmanager
def small_lapack():
    """Run small CPU decompositions (E x E) on one MKL thread: multi-threaded LAPACK on matrices this small is slower,
    and pathologically so when cores are oversubscribed (the catalog converts entries on a thread pool). The count is
    the calling thread's own: torch's process-wide thread count (`torch.set_num_threads`), which other threads read
    meanwhile, is never touched. Without MKL it changes nothing."""
    set_local = _mkl_thread_local_count()
    if set_local is None:
        yield
        return
    previous = set_local(1)
    try:
        yield
    finally:
        set_local(previous)


def damped_eigh(m: torch.Tensor, rel_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped to rel_eps of the largest: never divide by a null direction) and eigenvectors of a
    symmetric PSD matrix, float64."""
    with small_lapack():
        evals, evecs = torch.linalg.eigh(m.double())
    return evals.clamp_min(evals.max() * rel_eps), evecs


@dataclass(frozen=True)
class Whitening:
    """S and S^-1 with C = S S^T, the second moment of the attention inputs (E, E), float64; C itself as `moment`."""

    s: torch.Tensor
    s_inv: torch.Tensor
    moment: torch.Tensor

    @classmethod
    def from_second_moment(cls, second_moment: torch.Tensor) -> "Whitening":
        evals, evecs = damped_eigh(second_moment)
        root = evals.sqrt()
        return cls(s=evecs * root, s_inv=(evecs / root).T, moment=second_moment.double())


@dataclass(frozen=True)
class RowWeights:
    """L and L^-1 (out, out), block-diagonal per head: the error of the factored rows counts as ||L (W - W') X^T||."""

    l: torch.Tensor
    l_inv: torch.Tensor

    def block(self, rows: slice) -> "RowWeights":
        return RowWeights(self.l[rows, rows], self.l_inv[rows, rows])


def low_rank(
    w: torch.Tensor, rank: int, whitening: Whitening | None = None, rows: RowWeights | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors W ~= B @ A, in weight space or (whitened) on activations.

    w: (out, E). Returns B (out, rank), A (rank, E), float64; singular values split evenly between them.
    With whitening this minimises ||(W - B A) X^T||_F over the calibration inputs X, with `rows` too
    ||L (W - B A) X^T||_F (the SVD of L W S, mapped back).
    """
    m = w.double()
    m = m if rows is None else rows.l @ m
    m = m if whitening is None else m @ whitening.s
    with small_lapack():
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    root = sv[:rank].sqrt()
    b = u[:, :rank] * root  # (out, rank)
    a = root[:, None] * vh[:rank]  # (rank, E)
    return (b if rows is None else rows.l_inv @ b), (a if whitening is None else a @ whitening.s_inv)


def output_weights(q_nope: torch.Tensor, v: torch.Tensor, o_proj: torch.Tensor, whitening: Whitening) -> RowWeights:
    """Row weights that measure the latent's error where the layer uses it (svd="output-aware").

    q_nope (Hkv, n_rep, Dn, E) and v (Hkv, D, E) are source weights, o_proj (E_out, Hkv * n_rep * D); C (E, E) is
    the inputs' second moment (`whitening.moment`). A K_nope error moves the logits of the group's queries: M_k = sum_r Q_r C Q_r^T / D
    (the 1/sqrt(D) score scale squared), times the mean squared output of one value dim E||W_o v||^2 / D, the
    first-order size of what a logit error does to the output. A V error moves the output through o_proj:
    M_v = sum_r W_o,r^T W_o,r. Rows are laid out per head as [k_nope | v]; L = blockdiag(M^1/2).
    """
    hkv, n_rep, dn, _ = q_nope.shape
    d = v.shape[1]
    c, v, q_nope = whitening.moment, v.detach().double(), q_nope.detach().double()
    with small_lapack():
        m_k = torch.einsum("grde,ef,grcf->gdc", q_nope, c, q_nope) / d  # (Hkv, Dn, Dn)
        w_o = o_proj.detach().double().view(-1, hkv, n_rep, d)  # (E_out, Hkv, n_rep, D)
        m_v = torch.einsum("ogrd,ogrc->gdc", w_o, w_o)  # (Hkv, D, D)
        v_out = torch.einsum("gde,ef,gcf,gdc->g", v, c, v, m_v) / d  # (Hkv,) E||W_o v||^2 per value dim
        roots = [_sqrt_and_inverse(m) for h in range(hkv) for m in (m_k[h] * v_out[h], m_v[h])]
    return RowWeights(torch.block_diag(*(r for r, _ in roots)), torch.block_diag(*(ri for _, ri in roots)))


def _sqrt_and_inverse(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M^1/2 and M^-1/2 of a symmetric PSD matrix, damped like `Whitening` (empty for an empty M: no nope dims)."""
    if m.numel() == 0:
        return m, m
    evals, evecs = damped_eigh(m)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs / evals.sqrt()) @ evecs.T


def interleave_heads(k_nope: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(G, Dn, E), (G, D, E) -> (G * (Dn + D), E) rows laid out per head as [k_nope | v]."""
    return torch.cat([k_nope, v], dim=1).flatten(0, 1)


def factor_group(
    k_nope: torch.Tensor, v: torch.Tensor, rank: int, method: str, whitening: Whitening | None, rows: RowWeights | None
):
    """Factor one latent group. k_nope (G, Dn, E), v (G, D, E) -> up (G * (Dn + D), Rc), down (Rc, E)."""
    if method not in ("split", "joint", "aware", "output-aware"):
        raise ValueError(f"svd={method!r} is unknown; use 'split', 'joint', 'aware' or 'output-aware'")
    if method in ("aware", "output-aware") and whitening is None:
        raise ValueError(f"svd={method!r} needs the whitening of the calibration inputs")
    if method == "output-aware" and rows is None:
        raise ValueError("svd='output-aware' needs the row weights (output_weights)")
    if method != "split":
        w = interleave_heads(k_nope, v)
        return low_rank(w, rank, whitening if method != "joint" else None, rows if method == "output-aware" else None)
    g, dn, _ = k_nope.shape
    d, half = v.shape[1], rank // 2
    b_k, a_k = low_rank(k_nope.flatten(0, 1), half)  # (G*Dn, Rc/2), (Rc/2, E)
    b_v, a_v = low_rank(v.flatten(0, 1), half)  # (G*D, Rc/2), (Rc/2, E)
    up = torch.zeros(g, dn + d, rank, dtype=b_k.dtype)
    up[:, :dn, :half] = b_k.view(g, dn, half)  # K reads the first half of the latent
    up[:, dn:, half:] = b_v.view(g, d, half)  # V reads the second half
    return up.flatten(0, 1), torch.cat([a_k, a_v])


def factor_kv(
    k_nope: torch.Tensor, v: torch.Tensor, groups: int, rank: int, method: str, whitening=None, rows=None
):
    """Factor all KV heads into `groups` latent groups of `rank` dims each.

    k_nope (Hkv, Dn, E), v (Hkv, D, E) -> down (Hc * Rc, E), up (Hc, G * (Dn + D), Rc), float64.
    `rows` (RowWeights over all Hkv * (Dn + D) rows) weights the error per row block (svd="output-aware").
    """
    per_group = k_nope.shape[0] // groups
    width = per_group * (k_nope.shape[1] + v.shape[1])  # rows of one group
    ups, downs = [], []
    for g in range(groups):
        heads = slice(g * per_group, (g + 1) * per_group)
        group_rows = None if rows is None else rows.block(slice(g * width, (g + 1) * width))
        up, down = factor_group(k_nope[heads], v[heads], rank, method, whitening, group_rows)
        ups.append(up)
        downs.append(down)
    return torch.cat(downs), torch.stack(ups)


def identity_latent(k_nope: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """No low rank (partial RoPE only): the latent of each head is its [k_nope | v] itself.

    Returns down (Hkv * (Dn + D), E) and up (Hkv, Dn + D, Dn + D) = identity.
    """
    hkv, dn, _ = k_nope.shape
    width = dn + v.shape[1]
    down = interleave_heads(k_nope, v).double()
    return down, torch.eye(width, dtype=torch.float64).expand(hkv, width, width).clone()


def activation_error(w: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """Mean squared output error on calibration inputs: tr((W - W') C (W - W')^T)."""
    diff = (w - approx).detach().double()
    return float(torch.einsum("oi,ij,oj->", diff, second_moment.double(), diff))
