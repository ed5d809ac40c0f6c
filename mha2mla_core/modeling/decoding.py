"""Greedy or sampled decoding over a static cache, each decode step replayed from one CUDA graph.

Legend: B batch, P prompt tokens, N new tokens, T = P + N cache slots, V vocabulary.

HF's eager `generate()` spends most of a small model's decode step in Python (30 layers of launches); captured once
and replayed, a step costs only its GPU work, which is where MLA's smaller cache pays. The same decoder runs the
original model (transformers' `StaticCache`) and the MLA model (`StaticLatentCache`), so the two are compared on
equal terms. Everything a step changes lives in device tensors updated inside the step: the cache slots and lengths,
the last token, the positions, the attention mask and the output. Without CUDA the step runs eagerly (tested on CPU).
Sampling (temperature > 0) draws from the full softmax by the Gumbel-max trick; its noise comes from the default
generator, which a replayed graph advances like eager code, so a seeded run is reproducible.

An original grouped-query model decodes through `grouped_decode_attention`: transformers' sdpa path, given a mask
(a static cache always needs one), first copies every K/V head out to its query heads (`repeat_kv`), so a SmolLM2
step writes 3 copies of the cache and reads them; the grouped form reads each K/V head once. It applies to decode
steps only, and only where the model runs transformers' sdpa attention; the tokens are the same (tested). It pays
only with enough (row, K/V head) pairs: its value product reduces over the whole cache once per pair, and with few
pairs most of the GPU idles. On an H100 (SmolLM2 shape, `bench/generate.py`) it was 1.1-1.9x faster than `repeat_kv`
at 16 and 64 rows (48 and 192 pairs) but 2-4x slower at one row (3 pairs), so by default the decoder uses it from
`GROUPED_MIN_PAIRS` pairs on. The decoder calls a view of the model for it (`grouped_view`: the same weights, a config
of its own), so the caller's model, which another thread may be running, is never switched.

    ids = generate_static(model, input_ids, max_new_tokens=64)      # (B, P + 64), greedy, no early stop
    ids = generate_static(model, input_ids, 64, temperature=1.0)    # sampled (torch.manual_seed first to repeat)
    rows = sample_continuations(model, prompts, seq_len=512, seed=0)  # (N, 512): seeded, the caller's RNG untouched
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel, StaticCache
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mha2mla_core.kernels import grouped_query_decode
from mha2mla_core.modeling.latent_cache import left_padding
from mha2mla_core.modeling.modeling_mla import MLAForCausalLM

GROUPED_DECODE = "mha2mla_grouped_decode"
GROUPED_MIN_PAIRS = 48  # rows x K/V heads from which grouped decoding is the faster (measured at 3, 48 and 192)
# torch.compile's mode for a compiled one-row step on a GPU: Inductor picks Triton templates for the step's GEMVs and
# fuses their neighbours into them. SmolLM2-135M MLA, 4k context, one H200: 1.22 -> 0.97-1.03 ms a step (408 kernels
# instead of 440); the original 1.68 -> 1.26 ms. At 2,048 rows it lost (203k against 214k tokens/s, and 146 s to
# compile), so more rows keep Inductor's default mode.
ONE_ROW_COMPILE_MODE = "max-autotune-no-cudagraphs"


def compile_mode_for(rows: int, on_cuda: bool, mode: str | None = None) -> str:
    """torch.compile's mode for a decoder of `rows` rows: `mode` when given, else ONE_ROW_COMPILE_MODE for one row on
    a GPU and "default" otherwise."""
    if mode is not None:
        return mode
    return ONE_ROW_COMPILE_MODE if rows == 1 and on_cuda else "default"


def grouped_decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function. query (B, H, 1, D), key/value (B, Hkv, T, D), mask (B, 1, 1, T) bool
    (True = attend) or additive -> (B, 1, H, D). Given `decode_bounds` (the static decoder passes them), the step runs
    in `grouped_query_decode`, which reads only the written slots (the Triton split kernel on CUDA); otherwise two
    matmuls over the whole cache under the mask. Anything else (a prompt, no grouping, dropout, soft-capping,
    attention sinks) goes to transformers' sdpa unchanged."""
    b, h, q_len, d = query.shape
    hkv = key.shape[1]
    unusual = dropout > 0 or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if q_len != 1 or hkv == h or unusual:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    scale = d**-0.5 if scaling is None else scaling
    bounds = kwargs.get("decode_bounds")  # (kv_start (B,), kv_end (1,)): the static decoder's written slots
    if bounds is not None:
        return grouped_query_decode(query[:, :, 0], key, value, scale, *bounds).unsqueeze(1), None  # (B, 1, H, D)
    q = query.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D): the G query heads of a group share one K/V head
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, Hkv, G, T)
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (B, Hkv, G, D)
    return out.view(b, h, 1, d).transpose(1, 2), None


AttentionInterface.register(GROUPED_DECODE, grouped_decode_attention)


def grouped_view(model: PreTrainedModel) -> PreTrainedModel:
    """`model` as grouped decoding calls it. An original model that runs transformers' sdpa comes back as a view: new
    module objects over the same parameters and buffers (no tensor is copied), whose config (a copy) names
    `grouped_decode_attention`. Any other model comes back as it is. The caller's model and config never change, so a
    model shared with another thread keeps its own attention."""
    if isinstance(model, MLAForCausalLM) or model.config._attn_implementation != "sdpa":
        return model
    config = copy.deepcopy(model.config)
    config._attn_implementation = GROUPED_DECODE
    return _with_config(model, model.config, config)


def _with_config(module: torch.nn.Module, old: PretrainedConfig, new: PretrainedConfig) -> torch.nn.Module:
    """A shallow copy of the module tree (parameters, buffers and hooks shared) with `new` wherever `old` was."""
    view = copy.copy(module)
    view._modules = {name: None if child is None else _with_config(child, old, new)
                     for name, child in module._modules.items()}  # fmt: skip
    if getattr(module, "config", None) is old:
        view.config = new
    return view


def static_cache_for(model: PreTrainedModel, max_cache_len: int) -> Cache:
    """The model's own kind of static cache: latent for MLA models, full K/V for the originals."""
    if isinstance(model, MLAForCausalLM):
        return model.make_static_cache(max_cache_len)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@dataclass
class DecodeState:
    """The device tensors one decode step reads and updates in place (their addresses never change)."""

    cache: Cache
    tokens: torch.Tensor  # (B, 1) last token of each row
    positions: torch.Tensor  # (B, 1) its RoPE position (left padding makes rows differ)
    mask: torch.Tensor  # (B, 1, 1, T) bool: keys each row may attend to
    slot: torch.Tensor  # (1,) cache slot the next token is written to
    out: torch.Tensor  # (B, N) generated tokens
    step: torch.Tensor  # (1,) column of `out` the next token goes to

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self._tensors()]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self._tensors(), saved, strict=True):
            t.copy_(s)

    def _tensors(self) -> list[torch.Tensor]:
        lengths = [layer.cumulative_length for layer in self.cache.layers]
        return [self.tokens, self.positions, self.mask, self.slot, self.out, self.step, *lengths]


def next_tokens(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, V) logits -> (B, 1) tokens: the argmax (temperature 0) or a sample of softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    gumbel = -torch.empty_like(logits, dtype=torch.float32).exponential_().log_()  # (B, V): -log Exp(1) ~ Gumbel
    return (logits.float() / temperature + gumbel).argmax(-1, keepdim=True)


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
) -> DecodeState:
    """Run the prompt through a fresh static cache of P + N slots; the state holds the first new token."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: give 0 (greedy) or a positive sampling temperature")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: give at least 1")
    b, p = input_ids.shape  # (B, P)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P), as generate() numbers left-padded rows
    cache = static_cache_for(model, p + max_new_tokens)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
        use_cache=True, logits_to_keep=1,
    ).logits  # (B, 1, V)  # fmt: skip
    mask = torch.zeros(b, 1, 1, p + max_new_tokens, dtype=torch.bool, device=input_ids.device)  # (B, 1, 1, T)
    mask[:, 0, 0, :p] = attention_mask.bool()
    out = torch.zeros(b, max_new_tokens, dtype=torch.long, device=input_ids.device)  # (B, N)
    tokens = next_tokens(logits[:, -1], temperature)  # (B, 1)
    out[:, :1] = tokens
    one = torch.ones(1, dtype=torch.long, device=input_ids.device)
    return DecodeState(cache, tokens, positions[:, -1:] + 1, mask, one * p, out, one.clone())


class StaticDecoder:
    """Decodes from a prefilled `DecodeState`, one replay of a captured CUDA graph per token (eager off CUDA);
    greedy at temperature 0, else sampled."""

    def __init__(
        self,
        model: PreTrainedModel,
        state: DecodeState,
        cuda_graph: bool | None = None,
        temperature: float = 0.0,
        grouped: bool | None = None,
        compiled: bool = False,
        fused: bool = True,
        compile_mode: str | None = None,
    ):
        """`grouped`: whether an original GQA model decodes through `grouped_decode_attention` (True) or transformers'
        own sdpa path (False); None picks it by the batch (`GROUPED_MIN_PAIRS`). `compiled`: the step's model runs
        through torch.compile (Inductor fuses the small element-wise kernels between the matmuls; the decode kernels
        stay as they are), before the graph is captured. `fused`: an MLA model's step runs its attention in two matmuls
        around the decode kernel (`MLAAttention.fused_decode_weights`, built here from the weights as they are).
        `compile_mode`: torch.compile's mode when compiled; None picks it by the rows (`compile_mode_for`). The CUDA
        graph here is captured whatever the mode."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature}: give 0 (greedy) or a positive sampling temperature")
        if grouped is None:
            kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
            grouped = state.tokens.shape[0] * kv_heads >= GROUPED_MIN_PAIRS
        self.model, self.state, self.temperature, self.grouped = model, state, temperature, grouped
        self.step_model = grouped_view(model) if grouped else model  # the caller's model is never changed
        if compile_mode is not None and not compiled:
            raise ValueError(f"compile_mode={compile_mode!r} needs compiled=True")
        self.forward = self.step_model
        if compiled:
            mode = compile_mode_for(state.tokens.shape[0], state.tokens.is_cuda, compile_mode)
            self.forward = torch.compile(self.step_model, dynamic=False, mode=mode)
        self.kv_start = left_padding(state.mask) if self.step_model is not model else None  # (B,) grouped decoding
        self.fused = None  # per layer, for an MLA model's absorbed decode
        if fused and isinstance(model, MLAForCausalLM) and model.config.mla_decode == "absorbed":
            self.fused = [layer.self_attn.fused_decode_weights() for layer in model.model.layers]
        self.graph = None
        if cuda_graph if cuda_graph is not None else state.tokens.is_cuda:
            self.graph = self._capture()

    @torch.no_grad()
    def _step(self) -> None:
        s = self.state
        s.mask.index_fill_(3, s.slot, True)  # the slot written this step becomes visible
        extra = {} if self.kv_start is None else {"decode_bounds": (self.kv_start, s.slot + 1)}
        if self.fused is not None:
            extra["mla_decode_weights"] = self.fused
        logits = self.forward(
            input_ids=s.tokens, attention_mask=s.mask, position_ids=s.positions, past_key_values=s.cache, use_cache=True,
            **extra,
        ).logits  # (B, 1, V)
        s.tokens.copy_(next_tokens(logits[:, -1], self.temperature))
        s.out.index_copy_(1, s.step, s.tokens)
        s.positions.add_(1)
        s.slot.add_(1)
        s.step.add_(1)

    def _capture(self) -> torch.cuda.CUDAGraph:
        saved = self.state.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles kernels and sets up cuBLAS outside the capture
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.state.restore(saved)  # warm-up slots are rewritten before they are read
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.state.restore(saved)
        return graph

    def run(self, steps: int) -> torch.Tensor:
        """Decode `steps` more tokens; returns all tokens generated so far, (B, 1 + steps so far)."""
        room = self.state.out.shape[1] - int(self.state.step)
        if steps > room:
            raise ValueError(f"steps={steps} but the cache has room for {room} more tokens; prefill with more")
        for _ in range(steps):
            self.graph.replay() if self.graph is not None else self._step()
        return self.state.out[:, : int(self.state.step)]


def generate_static(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool | None = None,
    temperature: float = 0.0,
    grouped: bool | None = None,
    compiled: bool = False,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """`generate()` for exactly max_new_tokens (no early stop), greedy or sampled at `temperature`:
    (B, P + N) ids, the prompt included. `grouped`, `compiled` and `compile_mode` as in `StaticDecoder`."""
    state = prefill(model, input_ids, max_new_tokens, attention_mask, temperature)
    decoder = StaticDecoder(model, state, cuda_graph, temperature, grouped, compiled, compile_mode=compile_mode)
    new = decoder.run(max_new_tokens - 1)
    return torch.cat([input_ids, new], dim=1)


@torch.no_grad()
def sample_continuations(
    model: PreTrainedModel,
    prompts: torch.Tensor,
    seq_len: int,
    temperature: float = 1.0,
    seed: int = 0,
    compiled: bool = False,
    compile_mode: str | None = None,
) -> torch.Tensor:
    """Rows (N, seq_len) of `prompts` (N, P) continued by sampling from `model` (a HF causal LM); `compiled` and
    `compile_mode` as in `StaticDecoder`."""
    n, p = prompts.shape
    if not 1 <= p < seq_len:
        raise ValueError(f"prompts have {p} tokens; need 1 <= prompt length < seq_len={seq_len}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = generate_static(model, prompts.to(device), seq_len - p, temperature=temperature, compiled=compiled,
                              compile_mode=compile_mode)
    return out.cpu()  # (N, seq_len)
