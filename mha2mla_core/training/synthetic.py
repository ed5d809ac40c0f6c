"""Data-free rows: continuations sampled from the original model (as in LLM-QAT), to mix with real text.

Each row starts from a short prompt (e.g. the first tokens of a real row, or a single random token) and
is extended by sampling from the model at `temperature` until it is `seq_len` tokens long (EOS does not
end a row early). Sampling is `mha2mla_core.modeling.decoding.sample_continuations`: its own seeded RNG, so the
caller's RNG is untouched, and `generate_static`: one CUDA-graph replay per token on a GPU.
`mix_in_continuations` builds a training set with a given share of such rows (the fine-tuning stage's
`synthetic_fraction`; 1 = data-free, only the prompts come from real text).
"""

from __future__ import annotations

import torch
from torch import nn

from mha2mla_core.modeling.decoding import sample_continuations


def num_sampled_rows(fraction: float, num_rows: int) -> int:
    """How many of `num_rows` rows `mix_in_continuations` samples at `fraction` (at least one when fraction > 0)."""
    return max(1, round(fraction * num_rows)) if fraction > 0 else 0


def mix_in_continuations(
    model: nn.Module,
    rows: torch.Tensor,
    fraction: float,
    num_rows: int,
    prompt_tokens: int = 4,
    batch_size: int = 64,
    seed: int = 0,
) -> torch.Tensor:
    """`num_rows` training rows (num_rows, T): a `fraction` of them sampled from `model`, each continuing
    `prompt_tokens` real tokens taken at a seeded random offset of a real row, the rest real rows of `rows` (N, T)
    (all of them when N is smaller), both chosen by a seeded permutation. Offsets keep the prompts varied when
    there are far fewer real rows than sampled ones (data-free on a small text). `fraction` 0 returns `rows`."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"synthetic fraction={fraction} must be in [0, 1]: the share of sampled rows in the mix")
    if fraction == 0.0:
        return rows
    real, prompts = plan_continuations(rows, fraction, num_rows, prompt_tokens, seed)
    sampled = sample_batches(model, prompts, rows.shape[1], batch_size, seed)
    return torch.cat([real, *sampled.values()])  # (n_real + n_synthetic, T)


def plan_continuations(
    rows: torch.Tensor, fraction: float, num_rows: int, prompt_tokens: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `mix_in_continuations` keeps and samples from: the real rows (n_real, T) and the prompts
    (n_synthetic, prompt_tokens)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"synthetic fraction={fraction} must be in (0, 1] to sample any row")
    n, seq_len = rows.shape
    n_synthetic = num_sampled_rows(fraction, num_rows)
    if not 1 <= prompt_tokens < seq_len:
        raise ValueError(f"prompt_tokens={prompt_tokens}: need 1 <= prompt_tokens < the rows' {seq_len} tokens")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)  # (N,)
    real = rows[order[: min(n, num_rows - n_synthetic)]]  # (n_real, T)
    source = order[torch.arange(n_synthetic) % n]  # (n_synthetic,) row each prompt is taken from
    starts = torch.randint(0, seq_len - prompt_tokens + 1, (n_synthetic, 1), generator=g)  # (n_synthetic, 1)
    prompts = rows[source[:, None], starts + torch.arange(prompt_tokens)]  # (n_synthetic, prompt_tokens)
    return real, prompts


def sample_batches(
    model: nn.Module, prompts: torch.Tensor, seq_len: int, batch_size: int = 64, seed: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> dict[int, torch.Tensor]:
    """{first prompt index i: rows (b, seq_len)} for the batches of `batch_size` prompts (n, P) that shard
    (rank, world) samples: every world-th batch from the rank-th, each under seed + i, so that the shards of
    `world` processes together hold what one process samples."""
    rank, world = shard
    starts = range(rank * batch_size, prompts.shape[0], world * batch_size)
    return {i: sample_continuations(model, prompts[i : i + batch_size], seq_len, seed=seed + i) for i in starts}
