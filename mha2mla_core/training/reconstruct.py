"""Block-wise reconstruction: train each converted attention to reproduce the original attention's output.

As in post-training quantization, every layer is fitted locally on calibration activations, which is
cheap (only attention runs, no LM head, no teacher logits) and starts end-to-end training from a much
better point. For layer i:

    X_i, Y_i = inputs and output of the ORIGINAL model's layer-i `self_attn` (captured with hooks)
    loss_i   = ||student_attn_i(X_i) - Y_i||^2 / ||Y_i||^2                        (relative MSE)

Both attentions get the same call: hidden_states X_i (B, T, E), position_embeddings (cos, sin) (B, T, D)
and the attention mask the original received, so this works for any HF-style attention module. All
layers train together (their losses are summed; each layer's parameters only see their own term) with
AdamW on the student's attention parameters only; every other parameter is left untouched.

Legend: N calibration rows, T tokens per row, E hidden size, D head dim, L layers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mha2mla_core.training.config import ReconstructConfig, ReconstructResult, TrainEvent
from mha2mla_core.training.params import check_not_shared
from mha2mla_core.training.schedule import wsd_lr

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    """The original attentions' inputs and outputs on the calibration rows."""

    inputs: list[torch.Tensor]  # per layer (N, T, E), bf16 when cfg.bf16
    outputs: list[torch.Tensor]  # per layer (N, T, E) fp32
    cos_sin: tuple[torch.Tensor, torch.Tensor]  # (1, T, D) each: every row has positions 0..T-1
    mask: torch.Tensor | None  # (1, 1, T, T) or None (causal kernels need none)
    scale: torch.Tensor  # (L,) mean square of each layer's output, the denominators of the relative MSE


def reconstruct_attention(
    student: nn.Module,
    teacher: nn.Module,
    calib_rows: torch.Tensor,
    cfg: ReconstructConfig,
    callbacks: Sequence[Callable[[TrainEvent], None]] = (),
) -> ReconstructResult:
    """Fit every `student` layer's `self_attn` to `teacher`'s on `calib_rows` (N, T) token ids, in place."""
    s_layers, t_layers = student.get_decoder().layers, teacher.get_decoder().layers
    if len(s_layers) != len(t_layers):
        raise ValueError(f"student has {len(s_layers)} layers, teacher {len(t_layers)}: they must pair up")
    if calib_rows.ndim != 2 or calib_rows.shape[0] < 1:
        raise ValueError(f"calib_rows must be (N, T) token ids with N >= 1, got shape {tuple(calib_rows.shape)}")
    attns = [layer.self_attn for layer in s_layers]
    check_not_shared(student, teacher, {n for n, _ in student.named_parameters() if "self_attn." in n})
    start = time.perf_counter()
    captured = _capture(teacher, calib_rows, cfg.bf16)
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    params = [p for attn in attns for p in attn.parameters()]
    for p in params:
        p.requires_grad_(True)
    probe = torch.arange(min(cfg.micro_batch_size, calib_rows.shape[0]))
    before = _relative_errors(attns, captured, probe, cfg.bf16)
    try:
        _fit(attns, params, captured, cfg, callbacks)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    after = _relative_errors(attns, captured, probe, cfg.bf16)
    logger.info("reconstruction: mean relative MSE %.4f -> %.4f", sum(before) / len(before), sum(after) / len(after))
    return ReconstructResult(cfg.steps, time.perf_counter() - start, tuple(before), tuple(after))


@torch.no_grad()
def _capture(teacher: nn.Module, rows: torch.Tensor, bf16: bool, chunk: int = 8) -> _Captured:
    """Run the teacher (fp32, eval) over `rows` with hooks on every layer's self_attn."""
    device = next(teacher.parameters()).device
    layers = teacher.get_decoder().layers
    inputs, outputs = [[] for _ in layers], [[] for _ in layers]
    extra: dict = {}

    def hook(i):
        def save(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (b, T, E)
            inputs[i].append(x.to(torch.bfloat16 if bf16 else torch.float32))
            outputs[i].append((output[0] if isinstance(output, tuple) else output).float())
            if i == 0 and not extra:
                cos, sin = kwargs["position_embeddings"]
                mask = kwargs.get("attention_mask")
                extra.update(cos_sin=(cos[:1].float(), sin[:1].float()), mask=mask[:1] if mask is not None else None)
        return save

    handles = [layer.self_attn.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = teacher.training
    teacher.eval()
    try:
        for ids in rows.split(chunk):
            teacher(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        teacher.train(was_training)
    outs = [torch.cat(o) for o in outputs]
    scale = torch.stack([o.pow(2).mean() for o in outs]).clamp(min=1e-12)  # (L,)
    return _Captured([torch.cat(x) for x in inputs], outs, extra["cos_sin"], extra["mask"], scale)


def _layer_losses(attns: list[nn.Module], cap: _Captured, idx: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Relative MSE of every layer on rows `idx`: (L,)."""
    b = idx.numel()
    cos, sin = (t.expand(b, -1, -1) for t in cap.cos_sin)  # (B, T, D)
    mask = cap.mask.expand(b, *cap.mask.shape[1:]) if cap.mask is not None else None
    device_type = cap.scale.device.type
    losses = []
    for i, attn in enumerate(attns):
        x = cap.inputs[i][idx]  # (B, T, E)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out  # (B, T, E)
        losses.append((out.float() - cap.outputs[i][idx]).pow(2).mean() / cap.scale[i])
    return torch.stack(losses)


def _fit(attns, params, cap: _Captured, cfg: ReconstructConfig, callbacks) -> None:
    device = cap.scale.device
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    n_rows, row_tokens = cap.inputs[0].shape[:2]
    for attn in attns:
        attn.train()
    running = torch.zeros((), device=device)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = wsd_lr(step, cfg.steps, cfg)
        idx = torch.randint(n_rows, (cfg.micro_batch_size,), generator=gen).to(device)
        loss = _layer_losses(attns, cap, idx, cfg.bf16).sum()
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            window = (step % cfg.log_every) + 1
            metrics = {"loss": running.item() / window / len(attns), "lr": wsd_lr(step, cfg.steps, cfg)}
            running.zero_()
            event = TrainEvent("log", step + 1, cfg.steps, (step + 1) * cfg.micro_batch_size * row_tokens, metrics)
            for callback in callbacks:
                callback(event)
    for attn in attns:
        attn.eval()


@torch.no_grad()
def _relative_errors(attns, cap: _Captured, idx: torch.Tensor, bf16: bool) -> list[float]:
    return _layer_losses(attns, cap, idx.to(cap.scale.device), bf16).tolist()
