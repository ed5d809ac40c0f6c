"""Fade a converted student's latent down to a narrower one while it trains: bench/finetune.py (distillation) and
bench/cpu_reconstruct.py (block-wise reconstruction) use it to test whether a wide latent that is squeezed during
training ends better than the narrow conversion trained the same way."""

from __future__ import annotations

import torch
from torch import nn

from mha2mla_core.modeling.modeling_mla import GroupedLinear


class LatentFade:
    """Fade a converted student's latent from its width down to `keep` dims while it trains.

    Each layer's latent dims past `keep` are scaled by 1 - step / steps, so what they carry has to move into the kept
    dims before they reach zero; `truncate` then drops them, which leaves a `keep`-dim latent model. The output-aware
    SVD orders the latent by singular value, so the kept dims start as the narrower conversion's own factors.
    """

    def __init__(self, model: nn.Module, keep: int, steps: int):
        attns = [layer.self_attn for layer in model.model.layers]
        if attns[0].kv_latent_groups != 1 or not 0 < keep < attns[0].kv_lora_rank:
            raise ValueError(f"fading to {keep} dims needs one latent group wider than that, got "
                             f"{attns[0].kv_latent_groups} x {attns[0].kv_lora_rank}")
        self.keep, self.steps, self.step, self.first = keep, max(1, steps), 0, attns[0].kv_a_proj
        self.handles = [attn.kv_a_proj.register_forward_hook(self._fade) for attn in attns]

    @property
    def scale(self) -> float:
        return max(0.0, 1.0 - self.step / self.steps)

    def _fade(self, module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        if module is self.first and module.training:  # one training forward a step (grad_accum 1); a log event resyncs
            self.step += 1
        return torch.cat([out[..., : self.keep], out[..., self.keep :] * self.scale], dim=-1)

    def truncate(self, model: nn.Module) -> None:
        """Drop the faded dims in place (exact once the scale is 0): kv_a_proj keeps its first `keep` rows, kv_b_proj
        its first `keep` columns."""
        for handle in self.handles:
            handle.remove()
        for layer in model.model.layers:
            attn, wide_a, wide_b = layer.self_attn, layer.self_attn.kv_a_proj, layer.self_attn.kv_b_proj
            attn.kv_a_proj = nn.Linear(wide_a.in_features, self.keep, bias=False).to(wide_a.weight)
            attn.kv_a_proj.weight.data.copy_(wide_a.weight[: self.keep])
            attn.kv_b_proj = GroupedLinear(1, self.keep, wide_b.weight.shape[1], wide_b.bias is not None).to(wide_b.weight)
            attn.kv_b_proj.weight.data.copy_(wide_b.weight[..., : self.keep])
            if wide_b.bias is not None:
                attn.kv_b_proj.bias.data.copy_(wide_b.bias)
            attn.kv_lora_rank = self.keep
        model.config.kv_lora_rank = self.keep
