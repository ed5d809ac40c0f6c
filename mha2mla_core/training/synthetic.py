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


MAX_SAMPLING_ROWS = 2048  # rows decoded at once on a GPU; the KV reads then dominate a step (SmolLM2 on an H200)
SAMPLING_MEMORY_SHARE = 0.4  # of the GPU's memory, for the rows' static cache and logits


def sampling_dtype(device: torch.device) -> torch.dtype:
    """The teacher's dtype for sampling rows: bf16 on a GPU (tensor cores; the bench's data-free rows were sampled
    so), fp32 elsewhere. The pipeline once sampled in fp32 on the GPU: 23.6k tokens/s per H200, against 185k."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sampling_batch_rows(model: nn.Module, seq_len: int) -> int:
    """Rows `sample_batches` decodes at once: 64 off CUDA; on a GPU the largest power of two up to
    MAX_SAMPLING_ROWS whose full-length K/V cache and fp32 logits fit SAMPLING_MEMORY_SHARE of its memory. A step of
    512 rows costs 1.5x one of 64, so more rows sample faster: SmolLM2-135M on an H200 (bench/profile_step.py)
    samples 17k tokens/s at 64 rows, 89k at 512 and 163k at 2,048."""
    param = next(model.parameters())
    if param.device.type != "cuda":
        return 64
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * kv_heads * head_dim * seq_len * param.element_size()
    row_bytes = kv_bytes + 3 * 4 * cfg.vocab_size  # the cache, and the step's logits, noise and scores in fp32
    budget = SAMPLING_MEMORY_SHARE * torch.cuda.get_device_properties(param.device).total_memory
    fits = max(1, int(budget // row_bytes))
    return min(MAX_SAMPLING_ROWS, 2 ** (fits.bit_length() - 1))


def num_sampled_rows(fraction: float, num_rows: int) -> int:
    """How many of `num_rows` rows `mix_in_continuations` samples at `fraction` (at least one when fraction > 0)."""
    return max(1, round(fraction * num_rows)) if fraction > 0 else 0


def mix_in_continuations(
    model: nn.Module,
    rows: torch.Tensor,
    fraction: float,
    num_rows: int,
    prompt_tokens: int = 4,
    batch_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """`num_rows` training rows (num_rows, T): a `fraction` of them sampled from `model`, each continuing
    `prompt_tokens` real tokens taken at a seeded random offset of a real row, the rest real rows of `rows` (N, T)
    (all of them when N is smaller), both chosen by a seeded permutation. Offsets keep the prompts varied when
    there are far fewer real rows than sampled ones (data-free on a small text). `fraction` 0 returns `rows`.
    `batch_size`: rows sampled at once; None = `sampling_batch_rows`."""
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
    model: nn.Module, prompts: torch.Tensor, seq_len: int, batch_size: int | None = None, seed: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> dict[int, torch.Tensor]:
    """{first prompt index i: rows (b, seq_len)} for the batches of `batch_size` prompts (n, P) that shard
    (rank, world) samples: every world-th batch from the rank-th, each under seed + i, so that the shards of
    `world` processes together hold what one process samples. None = `sampling_batch_rows` (the same on every
    rank of one machine). On a GPU, a shard of several batches decodes through torch.compile (H200, 2,048 rows:
    185k tokens/s against 163k)."""
    batch_size = batch_size or sampling_batch_rows(model, seq_len)
    rank, world = shard
    starts = range(rank * batch_size, prompts.shape[0], world * batch_size)
    compiled = next(model.parameters()).is_cuda and len(starts) > 1  # compiling (~20 s, once) pays over batches
    return {i: sample_continuations(model, prompts[i : i + batch_size], seq_len, seed=seed + i, compiled=compiled)
            for i in starts}  # fmt: skip
