"""Distillation + language-modelling loss with a fused, chunked backward.

Legend: B batch rows, T tokens per row, V vocabulary, N = B*T.

    loss = w * T_kd^2 * mean_n KL(softmax(t_n / T_kd) || softmax(s_n / T_kd))      (all N positions)
         + (1 - w) * mean_n CE(s_n, ids_{n+1})                                        (N - B positions)

The forward pass walks the logits in chunks of rows and writes d loss / d logits as it goes, so the fp32
softmax temporaries of a 49k vocabulary never exist for the whole batch at once, and backward is one multiply.
`compiled=True` runs each chunk through torch.compile: eager, a chunk's softmaxes, casts and products are a dozen
passes over (rows, V) fp32 tensors (about 25 ms of a 151 ms SmolLM2 training step on an H200); Inductor fuses them
into a few.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_CHUNK_ROWS = 4096


def distill_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor, kd_weight: float,
    temperature: float, compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lm_loss, kd_loss): loss is differentiable w.r.t. `logits`; the parts are detached, for logging.

    logits, teacher_logits: (B, T, V); input_ids: (B, T). kd_weight = 0 ignores `teacher_logits` (may be None).
    `compiled`: each chunk through torch.compile (the same figures, fewer kernels).
    """
    if kd_weight > 0 and teacher_logits is None:
        raise ValueError(f"kd_weight={kd_weight} needs teacher logits; pass a teacher or set kd_weight=0")
    labels = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T): next token, -100 after the last
    teacher = teacher_logits if kd_weight > 0 else None
    return _DistillLoss.apply(logits, teacher, labels, kd_weight, temperature, compiled)


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, teacher_logits, labels, kd_weight, temperature, compiled):
        V = logits.shape[-1]
        s_all = logits.reshape(-1, V)  # (N, V)
        t_all = teacher_logits.reshape(-1, V) if teacher_logits is not None else None
        y_all = labels.reshape(-1)  # (N,)
        n_lm = (y_all != -100).sum().clamp(min=1).to(torch.float32)
        n_kd = float(y_all.numel())
        scales = ((1.0 - kd_weight) / n_lm, kd_weight * temperature / n_kd)
        grad = torch.empty_like(s_all)
        lm_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        kd_sum = torch.zeros_like(lm_sum)
        chunk_loss_and_grad = _compiled_chunk_loss_and_grad() if compiled else _chunk_loss_and_grad
        for i in range(0, s_all.shape[0], _CHUNK_ROWS):
            rows = slice(i, i + _CHUNK_ROWS)
            t = t_all[rows] if t_all is not None else None
            lm, kd, grad[rows] = chunk_loss_and_grad(s_all[rows], t, y_all[rows], kd_weight, temperature, scales,
                                                     grad.dtype)
            lm_sum += lm
            kd_sum += kd
        ctx.save_for_backward(grad.view_as(logits))
        lm_loss, kd_loss = lm_sum / n_lm, kd_sum / n_kd
        loss = (1.0 - kd_weight) * lm_loss + kd_weight * kd_loss
        ctx.mark_non_differentiable(lm_loss, kd_loss)
        return loss, lm_loss, kd_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_lm, _grad_kd):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def _chunk_loss_and_grad(s, t, y, kd_weight: float, temperature: float, scales, grad_dtype: torch.dtype):
    """Sums of CE and of T^2 KL over a chunk of rows, and the scaled gradient of the loss w.r.t. the chunk.

    s, t: (n, V) student / teacher logits (t None: no KD); y: (n,) labels; scales: (CE scale, KD scale)
    that turn the sums' gradients into the gradient of the batch loss; the gradient comes back in `grad_dtype`
    (the logits', so that a compiled chunk casts it in the same kernel).
    """
    s = s.float()
    valid = y != -100  # (n,)
    logp = torch.log_softmax(s, dim=-1)  # (n, V)
    lm = -(logp.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1) * valid).sum()
    kd = torch.zeros_like(lm)
    log_ps = logp if temperature == 1.0 else torch.log_softmax(s / temperature, dim=-1)
    if t is not None:
        log_pt = torch.log_softmax(t.float() / temperature, dim=-1)
        p_t = log_pt.exp()
        kd = temperature**2 * (p_t * (log_pt - log_ps)).sum()
        grad = (log_ps.exp() - p_t).mul_(scales[1])  # d(T^2 KL)/ds = T (p_s - p_t)
    else:
        grad = torch.zeros_like(s)
    if kd_weight < 1:  # softmax - onehot on the rows with a label (a scatter: no data-dependent shapes to compile)
        g_lm = logp.exp_().scatter_add_(1, torch.where(valid, y, 0)[:, None], -valid[:, None].to(logp.dtype))
        grad.add_(g_lm.mul_(valid[:, None] * scales[0]))
    return lm, kd, grad.to(grad_dtype)


@functools.cache
def _compiled_chunk_loss_and_grad():
    """`_chunk_loss_and_grad` through torch.compile, built on first use (one graph per chunk shape: the full chunks
    and the last one)."""
    return torch.compile(_chunk_loss_and_grad, dynamic=False)


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over layers of ||h_s - h_t||^2 / ||h_t||^2: each decoder layer's residual stream (B, T, E) against the
    teacher's, so every layer gets its own signal besides the logits'. Pass `hidden_states[1:]` of both models
    (index 0 is the embeddings, which the conversion does not change)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"student has {len(student)} hidden states, teacher {len(teacher)}: they must pair up")
    terms = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
