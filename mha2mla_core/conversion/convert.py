"""Convert a Llama-family model to MLA, streaming layer by layer.

Calibration activations flow through the ORIGINAL layers one at a time; each layer's attention
statistics (2-norm pair scores, the second moment of its inputs) are taken, its MLA attention is built,
and only then does the batch move on. The returned model shares the input's embeddings, MLPs and
norms (no copy): peak memory is the original model plus one layer's activations and new attention.

Legend: N calibration tokens, L sequence length, E hidden, H/Hkv heads, D head dim, Dr/Dn rope/nope dims.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mha2mla_core.conversion.arch import ArchSpec, arch_spec
from mha2mla_core.conversion.config import MLAConfig
from mha2mla_core.conversion.refit import refit_values
from mha2mla_core.conversion.rope import (
    RotatedRope, rope_and_nope_dims, rotate_rope, rotation_loss, score_rope_pairs, select_rope_pairs,
)  # fmt: skip
from mha2mla_core.conversion.svd import (
    Whitening,
    factor_kv,
    identity_latent,
    interleave_heads,
    output_weights,
    small_lapack,
)
from mha2mla_core.loading import copy_to_device
from mha2mla_core.modeling.modeling_mla import MLAAttention, MLAForCausalLM, MLALlamaConfig

logger = logging.getLogger(__name__)

_COPIED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "attention_dropout", "initializer_range", "mlp_bias",
)  # fmt: skip


@dataclass
class ConversionReport:
    """What conversion measured, for plots and logs. Tensors are on CPU."""

    rope_scores: torch.Tensor | None = None  # (layers, Hkv, D/2): 2-norm scores, or the rotated components' energy
    rope_pairs: list = field(default_factory=list)  # (layers, Hkv, Dr/2)
    spectra: list[torch.Tensor] = field(default_factory=list)  # per layer: singular values factored
    seconds: float = 0.0


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def latent_shape(config, cfg: MLAConfig) -> tuple[int, int]:
    """(Hc, Rc) of the converted attention: `kv_latent_groups` and `kv_lora_rank` (per group) from `kv_rank` (per KV
    head): Rc = kv_rank * Hkv / Hc."""
    hkv, d = config.num_key_value_heads, head_dim_of(config)
    if cfg.kv_rank is None and cfg.rope_strategy == "rotated":
        return 1, 2 * d * hkv  # every residual key row and value row, in the one group a shared RoPE key allows
    if cfg.kv_rank is None:
        return hkv, 2 * d - cfg.rope_dims
    groups = hkv if cfg.layout == "per_head" else 1
    return groups, cfg.kv_rank * hkv // groups


def check_convertible(config, cfg: MLAConfig) -> ArchSpec:
    """Every check that can fail, before any heavy work."""
    spec = arch_spec(config)
    cfg.check_against(head_dim_of(config), config.model_type, config.num_key_value_heads)
    groups, rank = latent_shape(config, cfg)
    if cfg.kv_rank is not None and rank > config.hidden_size:
        raise ValueError(
            f"kv_rank={cfg.kv_rank} with layout={cfg.layout!r} gives a latent of {rank} dims > "
            f"hidden_size={config.hidden_size} for model_type={config.model_type}; use a smaller kv_rank "
            "or layout='per_head'"
        )
    return spec


def mla_config_from(config, cfg: MLAConfig, spec: ArchSpec) -> MLALlamaConfig:
    """The MLA model config for a source config; rope_pairs start as 'high' and are filled per layer."""
    groups, rank = latent_shape(config, cfg)
    fields = {name: getattr(config, name) for name in _COPIED_FIELDS if getattr(config, name, None) is not None}
    fields["head_dim"] = head_dim_of(config)
    shared_rope = cfg.rope_strategy == "rotated"
    mla = MLALlamaConfig(
        qk_rope_head_dim=cfg.rope_dims * (config.num_key_value_heads if shared_rope else 1),
        shared_rope=shared_rope,
        kv_lora_rank=rank,
        kv_latent_groups=groups,
        q_bias=spec.qkv_bias(config),
        kv_bias=spec.qkv_bias(config),
        o_bias=spec.o_bias(config),
        source_model_type=config.model_type,
        mla_conversion=cfg.to_dict(),
        **fields,
    )
    mla._attn_implementation = config._attn_implementation
    return mla


def calibration_batches(calib_input_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """1-D token ids -> (n_seq, L) sequences of `seq_len` (one shorter sequence if fewer tokens)."""
    if calib_input_ids.dim() != 1:
        raise ValueError(f"calib_input_ids must be a 1-D tensor of token ids, got shape {tuple(calib_input_ids.shape)}")
    n = calib_input_ids.numel()
    if n < 2:
        raise ValueError(
            f"the calibration set has {n} tokens; give at least a few thousand (sample_calibration on real text)"
        )
    if n < seq_len:
        return calib_input_ids[None]
    return calib_input_ids[: n - n % seq_len].view(-1, seq_len)


LayerVisitor = Callable[[int, torch.nn.Module, torch.Tensor], torch.nn.Module | None]


@torch.no_grad()
def stream_layers(
    model: PreTrainedModel, batches: torch.Tensor, visit: LayerVisitor, chunk: int = 8,
    device: torch.device | None = None,
) -> None:
    """Run calibration batches through the decoder one layer at a time.

    `visit(i, attn, x_in)` sees layer i's attention and its inputs x_in (N, E) (after input_layernorm);
    it may return a replacement attention, swapped in after the batch has moved through the original layer.
    With `device`, each layer runs as a copy on it, one at a time, and the weights stay where they are (a model
    larger than the GPU converts there); `attn` is then the copy's, and the activations live on `device`.
    """
    decoder = model.model
    batches = batches.to(decoder.embed_tokens.weight.device)

    def on(module: torch.nn.Module) -> torch.nn.Module:  # where the layer runs
        return module if device is None else copy_to_device(module, device)

    hidden = [decoder.embed_tokens(ids) for ids in batches.split(chunk)]  # [(n, L, E)]
    if device is not None:
        hidden = [h.to(device) for h in hidden]
    positions = torch.arange(batches.shape[1], device=hidden[0].device)[None]
    rotary = on(decoder.rotary_emb)
    for i, layer in enumerate(decoder.layers):
        run = on(layer)
        x_in = torch.cat([run.input_layernorm(h).flatten(0, 1) for h in hidden])  # (N, E)
        replacement = visit(i, run.self_attn, x_in)
        del x_in
        for j, h in enumerate(hidden):
            out = run(h, attention_mask=None, position_ids=positions, position_embeddings=rotary(h, positions))
            hidden[j] = out[0] if isinstance(out, tuple) else out
        del run
        if replacement is not None:
            layer.self_attn = replacement


def query_key_states(attn: torch.nn.Module, x_in: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE q (N, H, D) and k (N, Hkv, D); pair norms are rotation-invariant, so RoPE is not needed."""
    n = x_in.shape[0]
    return attn.q_proj(x_in).view(n, -1, head_dim), attn.k_proj(x_in).view(n, -1, head_dim)


def second_moment(x_in: torch.Tensor) -> torch.Tensor:
    """C = X^T X / N (E, E) in float64."""
    x = x_in.double()
    return x.T @ x / x.shape[0]


@torch.no_grad()
def score_rope(model: PreTrainedModel, calib_input_ids: torch.Tensor, seq_len: int = 512) -> torch.Tensor:
    """2-norm pair scores of every layer: (layers, Hkv, D/2). The model is not modified."""
    d = head_dim_of(model.config)
    scores = []

    def visit(i, attn, x_in):
        scores.append(score_rope_pairs(*query_key_states(attn, x_in, d)).cpu())

    stream_layers(model, calibration_batches(calib_input_ids, seq_len), visit)
    return torch.stack(scores)


@dataclass(frozen=True)
class SourceAttention:
    """One source attention layer's weights split by KV head, in float64 for factoring."""

    q: torch.Tensor  # (Hkv, n_rep, D, E) rows reordered per head to [rope | nope]
    q_bias: torch.Tensor | None  # (Hkv, n_rep, D)
    k_rope: torch.Tensor  # (Hkv, Dr, E)
    k_nope: torch.Tensor  # (Hkv, Dn, E)
    v: torch.Tensor  # (Hkv, D, E)
    k_bias: tuple[torch.Tensor, torch.Tensor] | None  # (Hkv, Dr), (Hkv, Dn)
    v_bias: torch.Tensor | None  # (Hkv, D)
    o_proj: torch.nn.Module  # unchanged: value dims keep their order

    @classmethod
    def split(cls, attn: torch.nn.Module, pairs: torch.Tensor, head_dim: int, num_kv_heads: int) -> "SourceAttention":
        rope, nope = (idx.to(attn.q_proj.weight.device) for idx in rope_and_nope_dims(pairs, head_dim))
        order = torch.cat([rope, nope], dim=-1)  # (Hkv, D)
        hidden = attn.q_proj.weight.shape[1]
        q = attn.q_proj.weight.view(num_kv_heads, -1, head_dim, hidden)  # (Hkv, n_rep, D, E)
        k = attn.k_proj.weight.view(num_kv_heads, head_dim, hidden)  # (Hkv, D, E)
        q_bias = k_bias = v_bias = None
        if attn.q_proj.bias is not None:
            q_bias = attn.q_proj.bias.view(num_kv_heads, -1, head_dim).gather(2, order[:, None].expand_as(q[..., 0]))
        if attn.k_proj.bias is not None:
            kb = attn.k_proj.bias.view(num_kv_heads, head_dim)
            k_bias = (kb.gather(1, rope), kb.gather(1, nope))
            v_bias = attn.v_proj.bias.view(num_kv_heads, head_dim)
        return cls(
            q=q.gather(2, order[:, None, :, None].expand_as(q)),
            q_bias=q_bias,
            k_rope=k.gather(1, rope[..., None].expand(-1, -1, hidden)),
            k_nope=k.gather(1, nope[..., None].expand(-1, -1, hidden)),
            v=attn.v_proj.weight.view(num_kv_heads, head_dim, hidden),
            k_bias=k_bias,
            v_bias=v_bias,
            o_proj=attn.o_proj,
        )

    @classmethod
    def rotated(cls, attn: torch.nn.Module, rot: RotatedRope, head_dim: int, num_kv_heads: int) -> "SourceAttention":
        """Split for a shared rotated RoPE key: the key's rows are mixes of the KV heads' kept pairs, each query head
        reads them through its own scaled pair rows, and the non-RoPE part is every query row against the residual
        key rows (what the kept slots do not carry). Exact when every slot is kept."""
        dtype, hidden = attn.q_proj.weight.dtype, attn.q_proj.weight.shape[1]
        rows = torch.cat([rot.pairs, rot.pairs + head_dim // 2]).to(attn.q_proj.weight.device)  # (Dr,) source dims
        key_mix, query_mix = (torch.cat([m, m]).to(rows.device).T for m in (rot.key_mix, rot.query_mix))  # (Hkv, Dr)
        q = attn.q_proj.weight.double().view(num_kv_heads, -1, head_dim, hidden)  # (Hkv, n_rep, D, E)
        k = attn.k_proj.weight.double().view(num_kv_heads, head_dim, hidden)  # (Hkv, D, E)
        k_rope = torch.einsum("gs,gse->se", key_mix, k[:, rows])  # (Dr, E)
        k_nope = k.index_add(1, rows, -query_mix[..., None] * k_rope)  # (Hkv, D, E)
        q_rope = query_mix[:, None, :, None] * q[:, :, rows]  # (Hkv, n_rep, Dr, E)
        q_bias = k_bias = v_bias = None
        if attn.q_proj.bias is not None:
            qb = attn.q_proj.bias.double().view(num_kv_heads, -1, head_dim)  # (Hkv, n_rep, D)
            q_bias = torch.cat([query_mix[:, None] * qb[:, :, rows], qb], dim=-1).to(dtype)
        if attn.k_proj.bias is not None:
            kb = attn.k_proj.bias.double().view(num_kv_heads, head_dim)  # (Hkv, D)
            kb_rope = torch.einsum("gs,gs->s", key_mix, kb[:, rows])  # (Dr,)
            k_bias = (kb_rope[None].to(dtype), kb.index_add(1, rows, -query_mix * kb_rope).to(dtype))
            v_bias = attn.v_proj.bias.view(num_kv_heads, head_dim)
        return cls(
            q=torch.cat([q_rope, q], dim=2).to(dtype),
            q_bias=q_bias,
            k_rope=k_rope[None].to(dtype),
            k_nope=k_nope.to(dtype),
            v=attn.v_proj.weight.view(num_kv_heads, head_dim, hidden),
            k_bias=k_bias,
            v_bias=v_bias,
            o_proj=attn.o_proj,
        )


def build_attention(
    src: SourceAttention, mla_config: MLALlamaConfig, layer_idx: int, cfg: MLAConfig, whitening: Whitening | None
) -> MLAAttention:
    """An MLAAttention whose weights come from `src`: queries/rope keys copied, K_nope/V factored."""
    if cfg.kv_rank is None:
        down, up = identity_latent(src.k_nope, src.v)
        if mla_config.kv_latent_groups == 1 and src.k_nope.shape[0] > 1:  # one group: the heads' latents side by side
            up = torch.block_diag(*up)[None]
    else:
        rows = None
        if cfg.svd == "output-aware":
            q_nope = src.q[:, :, src.k_rope.shape[1] :]  # (Hkv, n_rep, Dn, E)
            rows = output_weights(q_nope, src.v, src.o_proj.weight, whitening)
        groups, rank = mla_config.kv_latent_groups, mla_config.kv_lora_rank
        down, up = factor_kv(src.k_nope, src.v, groups, rank, cfg.svd, whitening, rows)
    weight = src.q.new_empty(0)
    with torch.device(weight.device):
        attn = MLAAttention(mla_config, layer_idx).to(src.q.dtype)
    attn.o_proj = src.o_proj  # shared with the source, not copied
    attn.rope_pairs.copy_(torch.tensor(mla_config.rope_pairs[layer_idx]))
    attn.q_proj.weight.copy_(src.q.flatten(0, 2))
    attn.k_rope_proj.weight.copy_(src.k_rope.flatten(0, 1))
    attn.kv_a_proj.weight.copy_(down)
    attn.kv_b_proj.weight.copy_(up)
    if src.q_bias is not None:
        attn.q_proj.bias.copy_(src.q_bias.flatten())
    if src.k_bias is not None:
        attn.k_rope_proj.bias.copy_(src.k_bias[0].flatten())
        attn.kv_b_proj.bias.copy_(torch.cat([src.k_bias[1], src.v_bias], dim=-1).view_as(attn.kv_b_proj.bias))
    return attn


def spectrum(src: SourceAttention, whitening: Whitening | None) -> torch.Tensor:
    """Singular values of all K_nope/V rows of a layer (whitened if `whitening`), for the spectrum plot."""
    w = interleave_heads(src.k_nope, src.v).double()
    with small_lapack():
        return torch.linalg.svdvals(w if whitening is None else w @ whitening.s).cpu()


def assemble(model: PreTrainedModel, mla_config: MLALlamaConfig, attentions: list[MLAAttention]) -> MLAForCausalLM:
    """The MLA model around the source's own embeddings, MLPs and norms (moved, not copied)."""
    device = model.model.embed_tokens.weight.device
    with torch.device("meta"):
        mla = MLAForCausalLM(mla_config)
    mla.model.embed_tokens, mla.model.norm, mla.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
    with torch.device(device):
        mla.model.rotary_emb = LlamaRotaryEmbedding(mla_config)
    for layer, src_layer, attn in zip(mla.model.layers, model.model.layers, attentions):
        layer.self_attn, layer.mlp = attn, src_layer.mlp
        layer.input_layernorm, layer.post_attention_layernorm = src_layer.input_layernorm, src_layer.post_attention_layernorm
    mla.generation_config = model.generation_config
    on_meta = [name for name, t in [*mla.named_parameters(), *mla.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"conversion left tensors unset: {on_meta[:5]}")
    return mla.eval()


@torch.no_grad()
def convert_to_mla_with_report(
    model: PreTrainedModel, cfg: MLAConfig, calib_input_ids: torch.Tensor, rope_scores: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[MLAForCausalLM, ConversionReport]:
    """convert_to_mla, also returning the scores, kept pairs and spectra it measured.

    `rope_scores` (layers, Hkv, D/2) from `score_rope` skips recomputing them for the 2-norm strategy. `device`:
    compute there, on a copy of one layer at a time (`stream_layers`); the model, and the converted one, stay where
    the model is. A GPU thus converts a model that does not fit it, and its host copy is never duplicated.
    """
    device = None if device is None else torch.device(device)
    start = time.perf_counter()
    spec = check_convertible(model.config, cfg)
    batches = calibration_batches(calib_input_ids, cfg.calib_seq_len)
    mla_config = mla_config_from(model.config, cfg, spec)
    d, hkv = head_dim_of(model.config), model.config.num_key_value_heads
    report, attentions, scores = ConversionReport(), [], []
    position_loss = None
    if cfg.rope_window is not None:
        position_loss = rotation_loss(model.model.rotary_emb.inv_freq, cfg.rope_window)
    home = model.model.embed_tokens.weight.device  # where the model is, and the converted one will be
    rotary = model.model.rotary_emb if device is None else copy_to_device(model.model.rotary_emb, device)

    def visit(i, attn, x_in):
        if cfg.rope_strategy == "rotated":
            q, k = query_key_states(attn, x_in, d)
            rot = rotate_rope(q, k, cfg.rope_dims * hkv // 2, position_loss, prefix=position_loss is None)
            scores.append(rot.energy.T.float().cpu())  # (Hkv components, D/2)
            mla_config.rope_pairs[i] = [rot.pairs.tolist()]
            src = SourceAttention.rotated(attn, rot, d, hkv)
        else:
            layer_scores = rope_scores[i] if rope_scores is not None else None
            if cfg.rope_strategy == "2-norm" and layer_scores is None:
                layer_scores = score_rope_pairs(*query_key_states(attn, x_in, d)).cpu()
            scores.append(layer_scores)
            pairs = select_rope_pairs(cfg.rope_strategy, cfg.rope_dims, d, layer_scores).expand(hkv, -1)
            mla_config.rope_pairs[i] = pairs.tolist()
            src = SourceAttention.split(attn, pairs, d, hkv)
        aware = cfg.svd in ("aware", "output-aware")
        whitening = Whitening.from_second_moment(second_moment(x_in)) if aware else None
        report.spectra.append(spectrum(src, whitening))
        converted = build_attention(src, mla_config, i, cfg, whitening)
        if cfg.refit_values and cfg.kv_rank is not None:
            x = x_in.view(*batches.shape, -1)  # (n, L, E): the windows, in order
            positions = torch.arange(x.shape[1], device=x.device)[None]  # (1, L)
            refit_values(converted, attn, x, rotary(x, positions))
        if device is not None:  # built on the layer's copy: to where the model is, sharing the source's o_proj
            converted.o_proj = model.model.layers[i].self_attn.o_proj
            converted = converted.to(home)
        attentions.append(converted)
        logger.info("layer %d of %d converted", i + 1, len(model.model.layers))
        logger.debug("layer %d kept pairs %s", i, mla_config.rope_pairs[i])

    stream_layers(model, batches, visit, device=device)  # visit returns None: the source keeps its own attention
    mla = assemble(model, mla_config, attentions)
    report.rope_pairs = mla_config.rope_pairs
    report.rope_scores = torch.stack(scores) if cfg.rope_strategy in ("2-norm", "rotated") else None
    report.seconds = time.perf_counter() - start
    logger.info("converted %d layers in %.1fs", len(attentions), report.seconds)
    return mla, report


def convert_to_mla(model: PreTrainedModel, cfg: MLAConfig, calib_input_ids: torch.Tensor) -> MLAForCausalLM:
    """Convert a Llama/Mistral/Qwen2 causal LM to MLA.

    The result shares the source's embeddings, MLPs and norms (no copy); the source stays usable as long as
    neither is trained. Load an independent copy as a distillation teacher when training shared weights.
    """
    return convert_to_mla_with_report(model, cfg, calib_input_ids)[0]
