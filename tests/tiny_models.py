"""Tiny seeded source models (2 layers, hidden 64) for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip

# name -> (config class, model class, num_key_value_heads)
SOURCES = {
    "llama-mha": (LlamaConfig, LlamaForCausalLM, 4),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, 2),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, 2),
    "mistral-gqa": (MistralConfig, MistralForCausalLM, 2),
}


def tiny_model(name: str = "llama-gqa", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kv_heads = SOURCES[name]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, "num_key_value_heads": kv_heads, **overrides})
    if name.startswith("mistral"):
        config.sliding_window = None
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial biases, so dropping one would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(std=0.5)
    return model


def calib_ids(n: int = 512, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
