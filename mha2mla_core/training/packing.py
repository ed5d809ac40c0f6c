"""Sequence packing and the seeded, resumable order in which packed rows are visited.

Packing: every document is tokenized without special tokens, followed by EOS, concatenated into one stream
and cut into rows of `seq_len` tokens (the tail that does not fill a row is dropped). Rows may span
documents; attention stays causal over the whole row, as in GPT-style pre-training.

Order: epoch e visits the rows in a permutation seeded by (seed, e); global sample position p is row
`perm_e[p % N]` with e = p // N. The position is all a resumed run needs to continue the same order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Token rows (N, seq_len) int64 of the concatenated documents, each ended by the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id to separate packed documents; set tokenizer.eos_token")
    docs = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = np.array([tokenizer.eos_token_id], dtype=np.int64)
    stream = np.concatenate([part for ids in docs for part in (np.asarray(ids, dtype=np.int64), eos)])
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
    return torch.from_numpy(stream[: n_rows * seq_len].reshape(n_rows, seq_len))  # (N, seq_len)


def fingerprint_rows(rows: torch.Tensor) -> str:
    """Content hash of packed rows (shape and ids), so that a resumed run can check it reads the same data."""
    digest = hashlib.sha256(str(tuple(rows.shape)).encode())
    digest.update(rows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class RowOrder:
    """Maps global sample positions to row indices: a fresh seeded permutation of the N rows per epoch."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows, self.seed = n_rows, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Row indices of positions [start, start + count), crossing epochs as needed."""
        out = []
        for p in range(start, start + count):
            epoch, k = divmod(p, self.n_rows)
            out.append(self._permutation(epoch)[k])
        return torch.stack(out)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_rows, generator=gen)
        return self._perm
