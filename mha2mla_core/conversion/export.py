"""Export an MLA model to DeepSeek-V3's checkpoint format, the one vLLM, SGLang, llama.cpp and TensorRT-LLM serve.

Legend: L layers, E hidden, H query heads, Hkv KV heads, n_rep = H / Hkv, D head dim, P shared RoPE pairs,
Dr = 2P shared RoPE dims, Rc latent dims.

    ours (shared_rope, one latent group)          DeepSeek-V3 (q_lora_rank null)
    q_proj (H*(Dr+D), E) [q_pe | q_nope]          q_proj (H*(D+Dr), E) [q_nope | q_pe interleaved] * sqrt((D+Dr)/D)
    kv_a_proj (Rc, E), k_rope_proj (Dr, E)        kv_a_proj_with_mqa (Rc+Dr, E) [latent / s ; k_pe interleaved]
    (no latent norm)                              kv_a_layernorm (Rc,) = w ~ s * sqrt(eps), a power of two
    kv_b_proj (1, Hkv*(D+D), Rc) [k_nope | v]     kv_b_proj (H*(D+D), Rc) * s * sqrt(eps) / w: each KV head's rows
                                                  once per query head
    o_proj, MLPs, norms, embeddings               the same (times alpha where the residual stream is rescaled)

Scores: DeepSeek scales q.k by (D+Dr)**-0.5 and we by D**-0.5, so the q rows carry sqrt((D+Dr)/D). RoPE: our shared
key's pair j turns with the source's inv_freq[j] (rotated RoPE without a rope_window keeps the P fastest, j < P): DeepSeek's
default RoPE of dim Dr with rope_theta' = theta**(Dr/D); pairs move from rotate-half ([x_0..x_P-1 | y_0..y_P-1]) to
interleaved ([x_0, y_0, x_1, ...]) order.

The latent norm. DeepSeek always applies RMSNorm(c) = c * rsqrt(mean(c^2) + eps) * w to the latent; ours has none. We
put it in its linear regime: the latent rows are divided by s = 2^m, so RMSNorm(c / s) = c * w / (s sqrt(eps)) *
(1 - delta) with delta <= mean((c/s)^2) / (2 eps); w, a power of two near s * sqrt(eps), keeps the normed (cached)
latent at the size of c, and kv_b_proj carries what is left, s * sqrt(eps) / w in [0.7, 1.4]. The latent c = A x
reads the input norm's output x = g * u, u = h / sqrt(mean(h^2) + eps_in) with ||u||^2 <= E, so mean(c^2) <=
sigma_max(A diag(g))^2 * E / Rc for every token: s comes from that bound, from the weights alone, so that
delta <= LATENT_ERROR for any input (measured on calibration tokens when given, see `export_deepseek_v3`). Powers of
two divide the rows and make the norm weight exactly, so casting the export to bf16 only rounds each weight.
What breaks it: the latent rows are ~1e-6 of their old size, so the tensor kv_a_proj_with_mqa must stay in bf16 or
fp32. fp16 flushes them to subnormals, and per-tensor fp8 / int8 / GGUF q8_0 scales (fitted to the RoPE rows or
stored in fp16) round them to zero; block-scaled fp8 (128x128, DeepSeek's own) keeps them when Rc is a multiple of 128.
llama.cpp reads q_lora_rank for every DeepSeek model but V2-Lite, so `target="llamacpp"` adds a q LoRA of rank E in the
same regime: q_a_proj = I / s, q_a_layernorm = w, q_b_proj = the q rows * s * sqrt(eps) / w (same bound).

Quantized caches. llama.cpp caches one row a token and layer, [normed latent | k_pe], and reads the latent part as V;
its quantized cache types (q8_0, q4_0, ...) store rows in blocks of 32 values, so both the row and the latent must be
whole blocks. `kv_block=32` pads the RoPE key with zero pairs (zero rows in kv_a_proj_with_mqa and in every head's q
rows; their frequencies, DeepSeek's next ones, turn zeros), which changes no score, so that Rc + Dr is whole blocks.
A block shares one scale, but the SVD latent's channels differ in size by orders of magnitude, so the small ones
round to zero: the export turns the latent by a fixed random orthogonal matrix Q (kv_a_proj's latent rows Q A,
kv_b_proj's columns B Q^T; the norm in its linear regime scales all channels alike, so this is exact), after which
every channel is about as large as their mean. On SmolLM2 at rank 64, llama.cpp's q4_0 cache then costs 1.5% of PPL
instead of 7.9% zero shot, and 3.0% instead of 6.1% after a short reconstruction (bench/export_llamacpp.py).

The eps. transformers builds kv_a_layernorm with its default eps 1e-6 whatever the config says; vLLM, SGLang and
llama.cpp use config.rms_norm_eps. One checkpoint serves all of them when rms_norm_eps = 1e-6: for a source whose
norms use another eps, the residual stream is scaled by alpha = sqrt(1e-6 / eps) (embeddings, o_proj, down_proj; the
final norm's weight by 1 / alpha when lm_head is tied), which is exact: RMSNorm(alpha h; alpha^2 eps) = RMSNorm(h; eps).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, PreTrainedTokenizerBase
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from mha2mla_core.modeling.modeling_mla import MLAForCausalLM, MLALlamaConfig

logger = logging.getLogger(__name__)

TARGETS = ("hf", "llamacpp", "vllm", "trtllm")
# (kv_lora_rank, qk_rope_head_dim) the MLA kernels of each engine accept; absent: any layout
ENGINE_LAYOUTS = {"vllm": ((512, 64), (256, 64)), "trtllm": ((512, 64),)}
MIN_SAVING = 0.5  # an engine layout that saves less KV cache than this vs the original is refused
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm(kv_lora_rank) default; rms_norm_eps of every export
LATENT_ERROR = 1e-6  # bound on the latent's relative error through kv_a_layernorm, for every token
ROPE_RTOL = 1e-5  # DeepSeek's recomputed RoPE frequencies vs the source's (float32 pow of another base)


def export_deepseek_v3(
    model: MLAForCausalLM,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calib_ids: torch.Tensor | None = None,
    target: str = "hf",
    kv_block: int = 1,
    rotate_latent: bool = True,
) -> dict:
    """Write `model` as a DeepseekV3ForCausalLM checkpoint (config, safetensors, tokenizer, README.md) to `out_dir`.

    Raises ValueError before writing anything if the model cannot be expressed exactly (attention biases, RoPE
    frequencies other than the fastest P, fp16 weights) or `target`'s kernels refuse its layout. With `calib_ids`
    (1-D token ids) the latent norm's error and the logits of the written checkpoint are measured against `model`.
    `kv_block` > 1 pads the RoPE key so that the cached row is whole blocks of that many values (32: llama.cpp's
    quantized cache types). `rotate_latent` (exact, on by default) turns the latent by a fixed orthogonal matrix
    (`latent_rotation`) so that its channels are alike in scale, as the values of one block of a quantized cache
    share one scale. Returns what was written and measured (JSON-able)."""
    config = deepseek_config(model.config, target, kv_block)
    layout = check_engine_layout(model.config, target, kv_block)
    if model.dtype == torch.float16:
        raise ValueError(
            "the model is fp16: the exported latent rows are a millionth of their size or less (the latent norm's "
            "linear regime) and fp16 flushes them to subnormals; export from fp32 or bf16 (model.to(torch.bfloat16))"
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder: export into a new or empty folder")
    rotation = latent_rotation(config.kv_lora_rank) if rotate_latent else None
    state, scales = deepseek_state_dict(model, config, rotation)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        exported = DeepseekV3ForCausalLM(config)
    exported.load_state_dict(state, assign=True, strict=True)
    exported.tie_weights()
    exported.generation_config = model.generation_config
    exported.save_pretrained(out)
    add_legacy_rope_theta(out / "config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    summary = {
        "out_dir": str(out),
        "target": target,
        "format": "deepseek_v3",
        **layout,
        "kv_block": kv_block,
        "rotate_latent": rotate_latent,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "rope_theta": config.rope_parameters["rope_theta"],
        "residual_scale": residual_scale(model.config),
        "latent_norm_eps": LATENT_NORM_EPS,
        "latent_error_bound": LATENT_ERROR,
        "latent_scales": [list(pair) for pair in scales],  # per layer (kv, q) powers of two
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if calib_ids is not None:
        summary["measured"] = measure_export(model, out, calib_ids, scales)
    write_model_card(out, summary, model.config)
    summary["files"] = sorted(p.name for p in out.iterdir())
    logger.info("exported %s to %s (%s)", model.config.model_type, out, target)
    return summary


# ---- config -----------------------------------------------------------------------------------------------------
def check_exportable(config: MLALlamaConfig) -> None:
    """Every reason the model has no exact DeepSeek-V3 form, raised with the fix."""
    if config.q_bias or config.kv_bias or config.o_bias or getattr(config, "mlp_bias", False):
        raise ValueError(
            f"model_type={config.source_model_type} has attention biases (q_bias={config.q_bias}, kv_bias="
            f"{config.kv_bias}, o_bias={config.o_bias}, mlp_bias={getattr(config, 'mlp_bias', False)}): DeepSeek-V3's "
            "format has no q/k/v bias to fold them into (its attention_bias adds one to kv_a_proj_with_mqa and "
            "o_proj only, and vLLM and llama.cpp load neither); export a bias-free source (Llama, Mistral, SmolLM) "
            "or serve this model with our MLAForCausalLM"
        )
    if not config.shared_rope or config.kv_latent_groups != 1:
        raise ValueError(
            f"DeepSeek-V3 has ONE RoPE key and ONE latent shared by every head; this model has "
            f"shared_rope={config.shared_rope}, kv_latent_groups={config.kv_latent_groups}: convert with "
            "MLAConfig(layout='shared', rope_strategy='rotated') without a rope_window (the default)"
        )
    fastest = list(range(config.qk_rope_head_dim // 2))
    bad = [i for i, pairs in enumerate(config.rope_pairs) if pairs[0] != fastest]
    if bad:
        raise ValueError(
            f"layers {bad[:5]}{'...' if len(bad) > 5 else ''} keep RoPE frequencies {config.rope_pairs[bad[0]][0]}; "
            f"DeepSeek's RoPE turns pair j at theta'^(-2j/Dr), the fastest {len(fastest)} frequencies {fastest} in "
            "every layer: convert with rope_strategy='rotated' and no rope_window (MLAConfig's default for "
            "layout='shared'); a rope_window ranks each layer's own slots, which DeepSeek's format cannot hold"
        )


def deepseek_rope(config: MLALlamaConfig, dr: int | None = None) -> dict:
    """rope_parameters that make DeepSeek's RoPE of dim dr (default: the model's Dr; more with zero pairs padded
    after them) turn the source's fastest P frequencies: default RoPE with theta' = theta**(dr/D) if that matches
    (also the unscaled fast pairs of llama3 RoPE), else the source's own RoPE type with theta'; each checked by
    computing DeepSeek's frequencies with transformers' own rotary embedding."""
    source = LlamaRotaryEmbedding(config)
    pairs, d = config.qk_rope_head_dim // 2, config.head_dim
    dr = dr or config.qk_rope_head_dim
    theta = config.rope_parameters["rope_theta"] ** (dr / d)
    want = source.inv_freq[:pairs].double()
    found = []
    for params in ({"rope_type": "default", "rope_theta": theta}, {**config.rope_parameters, "rope_theta": theta}):
        probe = DeepseekV3Config(qk_rope_head_dim=dr, rope_parameters=dict(params),
                                 max_position_embeddings=config.max_position_embeddings)  # fmt: skip
        engine = DeepseekV3RotaryEmbedding(probe)
        error = ((engine.inv_freq[:pairs].double() - want).abs() / want).max().item()
        if error <= ROPE_RTOL and engine.attention_scaling == source.attention_scaling:
            return params
        found.append(f"{params['rope_type']}: {error:.2e}")
    raise ValueError(
        f"DeepSeek's RoPE of dim {dr} with theta={theta:.6g} turns the kept pairs away from the source's frequencies "
        f"(relative error by rope type: {', '.join(found)}); only frequency sets that depend on the pair index as "
        "theta**(-2j/D) (default RoPE, or the unscaled fast pairs of llama3 RoPE) are expressible"
    )


def residual_scale(config: MLALlamaConfig) -> float:
    """alpha = sqrt(1e-6 / rms_norm_eps): the residual-stream scale that moves every norm's eps to 1e-6 exactly."""
    return math.sqrt(LATENT_NORM_EPS / config.rms_norm_eps)


def padded_rope_dim(config: MLALlamaConfig, kv_block: int = 1) -> int:
    """The export's qk_rope_head_dim: the model's Dr, plus the zero dims that make kv_lora_rank + Dr whole blocks of
    `kv_block` values. The latent must already be whole blocks (llama.cpp reads it as the V rows)."""
    rc, dr = config.kv_lora_rank, config.qk_rope_head_dim
    if kv_block < 1 or (kv_block > 1 and kv_block % 2):
        raise ValueError(f"kv_block={kv_block} must be 1 (no padding) or an even block size, e.g. 32 (llama.cpp)")
    if rc % kv_block:
        multiple = kv_block // math.gcd(kv_block, config.num_key_value_heads)
        raise ValueError(
            f"kv_block={kv_block}: the latent (kv_lora_rank {rc}) is not whole blocks of {kv_block}, and llama.cpp "
            f"reads it as the V rows, so no RoPE padding can align it. Convert with a kv_rank that is a multiple of "
            f"{multiple} ({config.num_key_value_heads} KV heads x kv_rank must divide by {kv_block}), or export "
            "with kv_block=1 and an f16/bf16 cache"
        )
    return -(-(rc + dr) // kv_block) * kv_block - rc


def deepseek_config(config: MLALlamaConfig, target: str = "hf", kv_block: int = 1) -> DeepseekV3Config:
    """The DeepseekV3Config of the export: dense MLP in every layer, no q LoRA, one KV head per query head; the RoPE
    key padded to `padded_rope_dim`."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is unknown; use one of {TARGETS}")
    check_exportable(config)
    rope_dim = padded_rope_dim(config, kv_block)
    rope = deepseek_rope(config, rope_dim)
    if target != "hf" and rope.get("rope_type", "default") != "default":
        raise ValueError(
            f"target={target!r}: the source's RoPE is rope_type={rope['rope_type']!r}; vLLM, SGLang and llama.cpp run "
            "DeepSeek's non-default RoPE as YaRN, so only default RoPE serves exactly there; use target='hf', or keep "
            "fewer RoPE dims (rope_dims) so that only the unscaled fast pairs are kept"
        )
    layers = config.num_hidden_layers
    return DeepseekV3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size,
        num_hidden_layers=layers,
        first_k_dense_replace=layers,  # every layer keeps its dense MLP; no router, no experts
        num_mtp_layers=0,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        # llama.cpp requires q_lora_rank unless the model has DeepSeek-V2-Lite's 26/27 layers: a q LoRA of rank E
        q_lora_rank=config.hidden_size if target == "llamacpp" else None,
        kv_lora_rank=config.kv_lora_rank,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=config.head_dim,
        v_head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=LATENT_NORM_EPS,
        rope_parameters={"rope_type": "default", **rope},
        rope_interleave=True,
        attention_bias=False,
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        architectures=["DeepseekV3ForCausalLM"],
    )


def add_legacy_rope_theta(path: Path) -> None:
    """Also write rope_theta at the top level of config.json: readers built on transformers 4 (older vLLM, SGLang)
    take it from there and would otherwise fall back to DeepSeek's default 10000."""
    raw = json.loads(path.read_text())
    raw["rope_theta"] = raw["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def kv_values(config: MLALlamaConfig, kv_block: int = 1) -> dict:
    """Cached values per token and layer: the export's Rc + Dr (padded to `kv_block`) vs the source's 2 * Hkv * D,
    and the saving."""
    export = config.kv_lora_rank + padded_rope_dim(config, kv_block)
    original = 2 * config.num_key_value_heads * config.head_dim
    return {"kv_values_per_layer": export, "original_kv_values_per_layer": original, "kv_saving": 1 - export / original}


def engine_configs(config: MLALlamaConfig, target: str) -> list[dict]:
    """The MLAConfig settings (rope_strategy='rotated', no rope_window) whose export `target` accepts for this
    model shape, with the KV saving each gives; layouts the shape cannot reach are left out."""
    hkv, d = config.num_key_value_heads, config.head_dim
    original, found = 2 * hkv * d, []
    for rank, rope in ENGINE_LAYOUTS.get(target, ()):
        rope_dims, kv_rank = rope // hkv, rank // hkv
        if rope % hkv or rope_dims % 2 or rank % hkv or rope > d or rank > min(config.hidden_size, 2 * d * hkv):
            continue
        found.append({"rope_dims": rope_dims, "kv_rank": kv_rank, "kv_lora_rank": rank, "qk_rope_head_dim": rope,
                      "kv_saving": 1 - (rank + rope) / original})  # fmt: skip
    return found


def check_engine_layout(config: MLALlamaConfig, target: str, kv_block: int = 1) -> dict:
    """Raise if `target`'s MLA kernels refuse this model's exported layout (naming the MLAConfig that would pass and
    its KV saving vs the original 2 * Hkv * D values per layer), or if that layout saves less than MIN_SAVING.
    Returns the KV figures (`kv_values`) and the layouts the target accepts."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is unknown; use one of {TARGETS}")
    figures = kv_values(config, kv_block)
    accepted = ENGINE_LAYOUTS.get(target)
    if accepted is None:
        return {**figures, "engine_layouts": "any"}
    options = engine_configs(config, target)
    shape = f"Hkv={config.num_key_value_heads}, head_dim={config.head_dim} ({figures['original_kv_values_per_layer']} values per layer)"
    passing = [o for o in options if o["kv_saving"] >= MIN_SAVING]
    hint = "; ".join(
        f"MLAConfig(rope_strategy='rotated', rope_dims={o['rope_dims']}, kv_rank={o['kv_rank']}) "
        f"-> {o['kv_lora_rank']} + {o['qk_rope_head_dim']}, saves {o['kv_saving']:.1%}"
        for o in passing
    ) or (
        f"none: no rotated config of this shape reaches it with >= {MIN_SAVING:.0%} saving "
        f"(reachable: {[(o['kv_lora_rank'], o['qk_rope_head_dim'], round(o['kv_saving'], 3)) for o in options]}); "
        "serve with target='hf' or 'llamacpp'"
    )
    here = (config.kv_lora_rank, padded_rope_dim(config, kv_block))
    if here not in accepted:
        raise ValueError(
            f"target={target!r} runs MLA only with (kv_lora_rank, qk_rope_head_dim) in {list(accepted)}; this model "
            f"has {here}. For {shape}: {hint}"
        )
    if figures["kv_saving"] < MIN_SAVING:
        raise ValueError(
            f"target={target!r}: layout {here} caches {figures['kv_values_per_layer']} values per layer vs the "
            f"original's {figures['original_kv_values_per_layer']}, a saving of {figures['kv_saving']:.1%} "
            f"(< {MIN_SAVING:.0%}). For {shape}: {hint}"
        )
    return {**figures, "engine_layouts": [list(layout) for layout in accepted]}


# ---- weights ----------------------------------------------------------------------------------------------------
def interleave(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads * Dr, ...) rotate-half rows [x_0..x_P-1 | y_0..y_P-1] per head -> interleaved [x_0, y_0, x_1, ...]."""
    dr = rows.shape[0] // heads
    per_head = rows.reshape(heads, 2, dr // 2, *rows.shape[1:])  # (heads, 2, P, ...)
    return per_head.transpose(1, 2).reshape(rows.shape)  # (heads, P, 2, ...) -> (heads * Dr, ...)


def linear_regime_scale(sigma: float, rows: int, cols: int) -> float:
    """s = 2^m, the smallest power of two with mean((c/s)^2) / (2 eps) <= LATENT_ERROR for every c = W x, where
    sigma = sigma_max(W diag(g)) (W: rows x cols) and x = g * u reads the input norm (||u||^2 <= cols), so that
    mean(c^2) <= sigma^2 * cols / rows. A power of two divides W exactly, in any float format."""
    return 2.0 ** math.ceil(math.log2(sigma * math.sqrt(cols / (rows * 2 * LATENT_NORM_EPS * LATENT_ERROR))))


def latent_scales(attn: torch.nn.Module, input_norm: torch.nn.Module) -> tuple[float, float]:
    """(s of the kv latent kv_a_proj x, s of the q LoRA latent x itself) of one layer (`linear_regime_scale`)."""
    g = input_norm.weight.double()
    a = attn.kv_a_proj.weight.double() * g  # (Rc, E)
    kv = linear_regime_scale(torch.linalg.matrix_norm(a, ord=2).item(), *a.shape)
    return kv, linear_regime_scale(g.abs().max().item(), g.numel(), g.numel())


def norm_and_up_scales(s: float) -> tuple[float, float]:
    """(norm weight w, up-projection factor) for rows divided by s: the norm's output (c/s) * w / sqrt(eps) is c times
    a factor in [0.7, 1.4] that the up-projection takes back, so the cached latent keeps its size (engines compute
    with it in f16: llama.cpp's absorbed q . W_uk would overflow if W_uk carried s * sqrt(eps)); w is a power of two,
    exact in every format."""
    gain = s * math.sqrt(LATENT_NORM_EPS)
    w = 2.0 ** round(math.log2(gain))
    return w, gain / w


def latent_rotation(rc: int, seed: int = 0) -> torch.Tensor:
    """A fixed (Rc, Rc) float64 orthogonal matrix, Haar-random from `seed` (QR of a Gaussian, signs fixed): the
    latent Q c has every channel at about the mean of the SVD latent's channel variances, which differ by orders of
    magnitude. Exact: the norm in its linear regime scales every channel alike, and kv_b_proj takes Q^T."""
    gauss = torch.randn(rc, rc, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def attention_weights(
    attn: torch.nn.Module,
    scales: tuple[float, float],
    alpha: float,
    ds: DeepseekV3Config,
    rotation: torch.Tensor | None = None,
) -> dict:
    """One layer's DeepSeek attention tensors (computed in float64, returned in the model's dtype); the latent turned
    by `rotation` (Rc, Rc) where given."""
    h, d, rc, dr_out = ds.num_attention_heads, ds.v_head_dim, ds.kv_lora_rank, ds.qk_rope_head_dim
    hkv, dtype, dr = attn.num_kv_heads, attn.q_proj.weight.dtype, attn.k_rope_proj.weight.shape[0]
    q = attn.q_proj.weight.double().view(h, dr + d, -1)  # (H, Dr + D, E)
    q_pe = interleave(q[:, :dr].reshape(h * dr, -1), h).view(h, dr, -1)  # (H, Dr, E)
    q_pe = torch.nn.functional.pad(q_pe, (0, 0, 0, dr_out - dr))  # (H, Dr', E): zero pairs after the kept ones
    q = torch.cat([q[:, dr:], q_pe], dim=1).reshape(h * (d + dr_out), -1) * math.sqrt((d + dr_out) / d)
    k_pe = torch.nn.functional.pad(interleave(attn.k_rope_proj.weight.double(), 1), (0, 0, 0, dr_out - dr))  # (Dr', E)
    kv_b = attn.kv_b_proj.weight.double().view(hkv, 2 * d, rc)  # (Hkv, D + D, Rc)
    kv_b = kv_b.repeat_interleave(h // hkv, dim=0).reshape(h * 2 * d, rc)  # (H * (D + D), Rc)
    kv_a = attn.kv_a_proj.weight.double()  # (Rc, E)
    if rotation is not None:
        kv_a, kv_b = rotation @ kv_a, kv_b @ rotation.T
    w, up = norm_and_up_scales(scales[0])
    weights = {
        "kv_a_proj_with_mqa.weight": torch.cat([kv_a / scales[0], k_pe]),  # (Rc + Dr, E)
        "kv_a_layernorm.weight": torch.full((rc,), w, dtype=torch.float64),
        "kv_b_proj.weight": kv_b * up,
        "o_proj.weight": attn.o_proj.weight.double() * alpha,
    }
    if ds.q_lora_rank is None:
        weights["q_proj.weight"] = q
    else:  # q LoRA of rank E: x / s through its norm, then the q rows
        w, up = norm_and_up_scales(scales[1])
        weights["q_a_proj.weight"] = torch.eye(ds.q_lora_rank, dtype=torch.float64) / scales[1]
        weights["q_a_layernorm.weight"] = torch.full((ds.q_lora_rank,), w, dtype=torch.float64)
        weights["q_b_proj.weight"] = q * up
    return {name: t.to(dtype) for name, t in weights.items()}


@torch.no_grad()
def deepseek_state_dict(
    model: MLAForCausalLM, config: DeepseekV3Config, rotation: torch.Tensor | None = None
) -> tuple[dict, list[tuple[float, float]]]:
    """DeepseekV3ForCausalLM's state dict for `model` and each layer's (kv, q) latent scales; every layer's latent
    turned by `rotation` where given."""
    alpha, src = residual_scale(model.config), model.model
    state, scales = {"model.embed_tokens.weight": scaled(src.embed_tokens.weight, alpha)}, []
    for i, layer in enumerate(src.layers):
        prefix = f"model.layers.{i}."
        scales.append(latent_scales(layer.self_attn, layer.input_layernorm))
        for name, t in attention_weights(layer.self_attn, scales[-1], alpha, config, rotation).items():
            state[prefix + "self_attn." + name] = t
        state[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight.detach()
        state[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
        for name in ("gate_proj", "up_proj"):
            state[f"{prefix}mlp.{name}.weight"] = getattr(layer.mlp, name).weight.detach()
        state[prefix + "mlp.down_proj.weight"] = scaled(layer.mlp.down_proj.weight, alpha)
    if config.tie_word_embeddings:  # lm_head is the scaled embedding: the final norm takes the scale back
        state["model.norm.weight"] = scaled(src.norm.weight, 1 / alpha)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        state["model.norm.weight"] = src.norm.weight.detach()
        state["lm_head.weight"] = model.lm_head.weight.detach()
    return state, scales


def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t * factor computed in float64, in t's dtype; t itself (not a copy) when factor is 1."""
    return t.detach() if factor == 1 else (t.detach().double() * factor).to(t.dtype)


# ---- measurement and card ---------------------------------------------------------------------------------------
@torch.no_grad()
def latent_errors(model: MLAForCausalLM, ids: torch.Tensor, scales: list[tuple[float, float]]) -> tuple[float, float]:
    """Largest relative errors 1 - sqrt(eps / (mean((c/s)^2) + eps)) of the kv latent c = kv_a_proj x and of the q
    LoRA latent c = x through their RMSNorms, over the tokens `ids` (1, T) and all layers, in float64."""
    worst, hooks = [0.0, 0.0], []

    def error(c: torch.Tensor, s: float) -> float:
        m = (c.double() / s).square().mean(-1)  # (B, T)
        return (1 - torch.sqrt(LATENT_NORM_EPS / (m + LATENT_NORM_EPS))).max().item()

    def hook(kv_scale, q_scale):
        def record(module, inputs, c):
            worst[0], worst[1] = max(worst[0], error(c, kv_scale)), max(worst[1], error(inputs[0], q_scale))

        return record

    for layer, (kv_scale, q_scale) in zip(model.model.layers, scales):
        hooks.append(layer.self_attn.kv_a_proj.register_forward_hook(hook(kv_scale, q_scale)))
    try:
        model(ids, use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return worst[0], worst[1]


@torch.no_grad()
def measure_export(model: MLAForCausalLM, out: Path, calib_ids: torch.Tensor, scales: list, tokens: int = 512) -> dict:
    """The latent norm's largest relative error and the logits' max-abs difference of the checkpoint in `out`
    (loaded with transformers' DeepseekV3ForCausalLM) vs `model`, on the first `tokens` calibration tokens."""
    if calib_ids.dim() != 1:
        raise ValueError(f"calib_ids must be a 1-D tensor of token ids, got shape {tuple(calib_ids.shape)}")
    ids = calib_ids[:tokens][None].to(model.device)  # (1, T)
    exported = DeepseekV3ForCausalLM.from_pretrained(out, dtype=model.dtype).to(model.device).eval()
    ours, theirs = model(ids, use_cache=False).logits.float(), exported(ids, use_cache=False).logits.float()
    kv_error, q_error = latent_errors(model, ids, scales)
    return {
        "tokens": ids.shape[1],
        "latent_rel_error_max": kv_error,
        **({"q_latent_rel_error_max": q_error} if exported.config.q_lora_rank else {}),
        "logits_max_abs_diff": (ours - theirs).abs().max().item(),
        "logits_max_abs": ours.abs().max().item(),
        "same_argmax": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
    }


ROTATED_CARD = ("turned by a fixed orthogonal matrix (mha2mla's `latent_rotation`, seed 0; exact) so that its channels "
                "are alike in scale, as the blocks of a quantized KV cache need")
SVD_CARD = "the conversion's SVD basis (channels fall in scale; export with rotate_latent for a block-quantized cache)"


def write_model_card(out: Path, summary: dict, config: MLALlamaConfig, source: dict | None = None, quality: dict | None = None) -> None:
    """README.md of the export: source, conversion config, KV cache per token, the latent norm's bound, measured
    figures (`summary['measured']`, `quality`)."""
    dtype_bytes = torch.tensor([], dtype=getattr(torch, summary["dtype"])).element_size()
    layers = config.num_hidden_layers
    per_token = summary["kv_values_per_layer"] * layers
    original = summary["original_kv_values_per_layer"] * layers
    source = source or {"name": getattr(config, "_name_or_path", "") or config.source_model_type}
    pad = summary["qk_rope_head_dim"] - config.qk_rope_head_dim
    padding = f", {pad} of them zero: rows of whole {summary['kv_block']}-value blocks for quantized caches" if pad else ""
    lines = [
        "---", "library_name: transformers", "tags: [mla, deepseek_v3, mha2mla]", "---", "",
        f"# {source['name']} as multi-head latent attention (DeepSeek-V3 format)", "",
        "Converted by mha2mla from a Llama-family model and written as `DeepseekV3ForCausalLM` (dense MLP in every "
        "layer, no q LoRA): load it with `AutoModelForCausalLM.from_pretrained(path)`, or serve it with vLLM, SGLang "
        "or llama.cpp (`convert_hf_to_gguf.py`, architecture deepseek2). No `trust_remote_code`. Serve it in bf16 or "
        "fp32 (`vllm serve --dtype bfloat16`), never fp16.", "",
        "| | |", "| --- | --- |",
        f"| source | {source['name']} |",
        f"| source sha256 | {source.get('sha256', 'unknown')} |",
        f"| conversion | `{json.dumps(config.mla_conversion, sort_keys=True)}` |",
        f"| export target | {summary['target']} |",
        f"| KV cache per token | {per_token} values = {per_token * dtype_bytes:,} bytes in {summary['dtype']} "
        f"({layers} layers x (kv_lora_rank {summary['kv_lora_rank']} + qk_rope_head_dim {summary['qk_rope_head_dim']}"
        f"{padding})) |",
        f"| original KV cache per token | {original} values = {original * dtype_bytes:,} bytes |",
        f"| KV saving | {summary['kv_saving']:.1%} |",
        f"| RoPE | default, rope_theta {summary['rope_theta']:.6g} on {summary['qk_rope_head_dim']} dims, interleaved |",
        f"| latent basis | {ROTATED_CARD if summary['rotate_latent'] else SVD_CARD} |",
        "", "## The latent norm", "",
        "`kv_a_layernorm` (and `q_a_layernorm`, when present) runs in its linear regime (latent rows of "
        "`kv_a_proj_with_mqa` divided by a power of two s, norm weight a power of two w near s * sqrt(1e-6), "
        "`kv_b_proj` times s * sqrt(1e-6) / w): the "
        f"latent's relative error is at most {LATENT_ERROR:g} for every token, by a bound from the weights. Keep `kv_a_proj_with_mqa` in bf16 or fp32: fp16, per-tensor fp8, int8 or GGUF q8_0/k-quants of "
        "that one tensor round its latent rows to zero (with llama.cpp, convert with `--outtype bf16` or `f32`, or "
        "quantize with `--tensor-type attn_kv_a_mqa=bf16`). `rms_norm_eps` is 1e-6 for every norm, the eps "
        f"transformers gives this norm; the residual stream was scaled by {summary['residual_scale']:.6g} to keep "
        "the source's norms exact.",
    ]  # fmt: skip
    measured = {**summary.get("measured", {}), **(quality or {})}
    if measured:
        lines += ["", "## Measured", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in measured.items()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
