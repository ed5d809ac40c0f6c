"""Data-free rows: continuations sampled from the original model (as in LLM-QAT), to mix with real text.

Each row starts from a short prompt (e.g. the first tokens of a real row, or a single random token) and
is extended by sampling from the model at `temperature` until it is `seq_len` tokens long (EOS is not
allowed to end a row early). Sampling runs under its own seeded RNG, so the caller's RNG is untouched.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample_continuations(
    model: nn.Module, prompts: torch.Tensor, seq_len: int, temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Rows (N, seq_len) of `prompts` (N, P) continued by sampling from `model` (a HF causal LM)."""
    n, p = prompts.shape
    if not 1 <= p < seq_len:
        raise ValueError(f"prompts have {p} tokens; need 1 <= prompt length < seq_len={seq_len}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    device = next(model.parameters()).device
    new = seq_len - p
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=prompts.to(device), attention_mask=torch.ones_like(prompts, device=device), do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
            pad_token_id=model.config.eos_token_id,
        )  # fmt: skip
    return out[:, :seq_len].cpu()  # (N, seq_len)
