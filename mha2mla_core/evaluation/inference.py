"""Inference cost: KV-cache bytes per token, peak memory, prefill and decode tokens/s.

For each (batch B, context T): a prefill forward of random token ids (B, T) with a fresh cache; the KV bytes per
token read from that cache's own tensors; `decode_steps` greedy single-token forwards through the cache (the
explicit decode loop); then `generate()` with as many new tokens. Memory is the peak above the starting level
over prefill + decode: `torch.cuda.max_memory_allocated` on a GPU, else the process RSS sampled by a thread
(psutil), which also counts allocator caching and is coarser.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

from mha2mla_core.evaluation.paths import check_fits_context

logger = logging.getLogger(__name__)

RSS_SAMPLE_SECONDS = 0.002


@dataclass(frozen=True)
class InferenceConfig:
    contexts: tuple[int, ...] = (512, 2048)  # prompt tokens per sequence
    batch_sizes: tuple[int, ...] = (1, 4)
    decode_steps: int = 32  # new tokens per sequence, for the decode loop and for generate()
    repeats: int = 1  # measure each point this many times and keep the best speed (noisy, shared machines)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("contexts", "batch_sizes"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{name}={values} must be a non-empty list of positive integers")
        for name in ("decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class InferencePoint:
    batch: int
    context: int
    prefill_tok_s: float  # B*T / prefill seconds
    decode_tok_s: float  # B*steps / seconds of the explicit single-token decode loop
    generate_tok_s: float  # B*steps / seconds of generate(), prefill included
    kv_bytes_per_token: float  # per sequence, from the cache after prefill
    peak_memory_bytes: int
    memory_kind: str  # "cuda_max_allocated" or "rss_delta"


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor that holds cached tokens: the attributes of each cache layer (any HF Cache), or the
    tensors of a legacy tuple cache. 0-dim tensors (counters) are not token storage and are left out."""
    found: list[torch.Tensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.dim() > 0:
                found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)

    if hasattr(cache, "layers"):
        for layer in cache.layers:
            for value in vars(layer).values():
                visit(value)
    else:
        visit(cache)
    return found


def cache_bytes_per_token(cache: Any, batch: int, tokens: int) -> float:
    """Bytes of all cached tensors divided by batch * tokens (per token per sequence, all layers)."""
    total = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    if total == 0:
        raise ValueError("the cache holds no tensors: run a forward pass with use_cache=True first")
    return total / (batch * tokens)


class PeakMemory:
    """Peak memory above the level at entry, while the block runs (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_delta"
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        process = psutil.Process()
        self._base = self._max_rss = process.memory_info().rss
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(RSS_SAMPLE_SECONDS):
                self._max_rss = max(self._max_rss, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = self._max_rss - self._base


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def measure_point(model: PreTrainedModel, batch: int, context: int, cfg: InferenceConfig) -> InferencePoint:
    """One (batch, context) point: prefill, KV bytes, explicit decode loop, then generate()."""
    device = model.device
    generator = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device)  # (B, T)
    with PeakMemory(device) as memory:
        start = _now(device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill_s = _now(device) - start
        cache = out.past_key_values
        kv_bytes = cache_bytes_per_token(cache, batch, context)
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        start = _now(device)
        for _ in range(cfg.decode_steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        decode_s = _now(device) - start
    del out, cache
    # pad_token_id is never used (no padding; eos_token_id=None never stops early); set to keep generate quiet
    generation = GenerationConfig(
        max_new_tokens=cfg.decode_steps, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    start = _now(device)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation)
    generate_s = _now(device) - start
    new_tokens = batch * cfg.decode_steps
    return InferencePoint(
        batch=batch,
        context=context,
        prefill_tok_s=batch * context / prefill_s,
        decode_tok_s=new_tokens / decode_s,
        generate_tok_s=new_tokens / generate_s,
        kv_bytes_per_token=kv_bytes,
        peak_memory_bytes=memory.peak_bytes,
        memory_kind=memory.kind,
    )


def check_inference(config: PretrainedConfig, cfg: InferenceConfig) -> None:
    check_fits_context(config, max(cfg.contexts), cfg.decode_steps, ("contexts", "decode_steps"))


def run_inference(model: PreTrainedModel, cfg: InferenceConfig) -> tuple[InferencePoint, ...]:
    """All (batch, context) points, after one small warm-up point that is not reported."""
    check_inference(model.config, cfg)
    measure_point(model, 1, min(8, min(cfg.contexts)), InferenceConfig(contexts=(8,), decode_steps=2))
    points = []
    for context in cfg.contexts:
        for batch in cfg.batch_sizes:
            point = best_of([measure_point(model, batch, context, cfg) for _ in range(cfg.repeats)])
            logger.info("inference: %s", point)
            points.append(point)
    return tuple(points)


def best_of(points: list[InferencePoint]) -> InferencePoint:
    """The fastest of each speed over repeated measurements of one point, and the largest peak memory."""
    return replace(
        points[0],
        prefill_tok_s=max(p.prefill_tok_s for p in points),
        decode_tok_s=max(p.decode_tok_s for p in points),
        generate_tok_s=max(p.generate_tok_s for p in points),
        peak_memory_bytes=max(p.peak_memory_bytes for p in points),
    )


@torch.inference_mode()
def probe_kv_bytes_per_token(model: PreTrainedModel, probe_tokens: int) -> float:
    """Cache bytes per token per sequence, read from the cache's own tensors after one forward of `probe_tokens`
    tokens (long enough for a quantized cache to hold codes beyond its full-precision residual window).

    MLA models measure their own cache (`kv_bytes_per_token`, the latent cache they make); any other model's
    cache is the one its forward returns.
    """
    if probe_tokens < 1:
        raise ValueError(f"probe_tokens={probe_tokens} must be >= 1")
    if hasattr(model, "kv_bytes_per_token"):
        return float(model.kv_bytes_per_token(probe_tokens))
    ids = torch.zeros(1, probe_tokens, dtype=torch.long, device=model.device)  # (1, T)
    return cache_bytes_per_token(model(input_ids=ids, use_cache=True).past_key_values, 1, probe_tokens)


def reported_kv_bytes_per_token(model: PreTrainedModel) -> float | None:
    """The model's own figure where it has one (MLA models: `kv_bytes_per_token()`), else None."""
    report = getattr(model, "kv_bytes_per_token", None)
    return float(report()) if callable(report) else None
