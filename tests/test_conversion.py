"""Conversion exactness, RoPE pair selection, SVD quality and bad input (tiny seeded models, CPU)."""

import pytest
import torch

from mha2mla_core import MLAConfig, convert_to_mla, convert_to_mla_with_report, score_rope
from mha2mla_core.conversion.convert import SourceAttention, query_key_states, second_moment
from mha2mla_core.conversion.rope import rope_and_nope_dims, score_rope_pairs, select_rope_pairs
from mha2mla_core.conversion.svd import (
    Whitening,
    activation_error,
    factor_kv,
    interleave_heads,
    output_weights,
    small_lapack,
)
from tests.tiny_models import SOURCES, calib_ids, tiny_model

HEAD_DIM = 16  # hidden 64 / 4 heads


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("layout", ["per_head", "shared"])
@pytest.mark.parametrize("svd", ["joint", "aware", "output-aware"])
def test_full_rope_full_rank_reproduces_logits(source, layout, svd):
    model = tiny_model(source)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    reference = model(ids).logits
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=HEAD_DIM, kv_rank=HEAD_DIM, svd=svd, layout=layout, calib_seq_len=64)
    mla = convert_to_mla(model, cfg, calib_ids())
    assert mla.config.model_type == "mla_llama"
    torch.testing.assert_close(mla(ids).logits, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("source", ["llama-gqa", "qwen2-bias"])
def test_partial_rope_full_rank_is_exact_for_fixed_pairs_and_reaches_all_dims(source):
    """Full-rank latent with all pairs kept in another order ('2-norm' with r = D) is still exact."""
    model = tiny_model(source)
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(6))
    reference = model(ids).logits
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=HEAD_DIM, kv_rank=None, calib_seq_len=64)
    mla = convert_to_mla(model, cfg, calib_ids())
    torch.testing.assert_close(mla(ids).logits, reference, atol=1e-4, rtol=0)


def test_partial_rope_changes_logits_but_low_rank_is_not_needed_for_it():
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(6))
    mla = convert_to_mla(model, MLAConfig(rope_dims=4, kv_rank=None, calib_seq_len=64), calib_ids())
    assert (mla(ids).logits - model(ids).logits).abs().max() > 1e-3  # dropping RoPE dims is not a no-op


@pytest.mark.parametrize(
    "strategy, expected",
    [("high", [0, 1, 2]), ("low", [13, 14, 15]), ("uniform", [0, 5, 10])],
)
def test_fixed_strategies_keep_the_right_pairs(strategy, expected):
    pairs = select_rope_pairs(strategy, rope_dims=6, head_dim=32, scores=torch.zeros(2, 16))
    assert pairs.tolist() == [expected, expected]


def test_two_norm_keeps_the_top_pairs_per_kv_head():
    scores = torch.zeros(2, 8)
    scores[0, [6, 1]] = torch.tensor([5.0, 3.0])
    scores[1, [0, 7]] = torch.tensor([1.0, 2.0])
    assert select_rope_pairs("2-norm", 4, 16, scores).tolist() == [[1, 6], [0, 7]]


def test_two_norm_scores_equal_brute_force():
    torch.manual_seed(0)
    n, h, hkv, d = 7, 6, 2, 8
    q, k = torch.randn(n, h, d), torch.randn(n, hkv, d)
    brute = torch.zeros(hkv, d // 2)
    for g in range(hkv):
        for qh in range(g * 3, g * 3 + 3):  # query heads of group g
            for p in range(d // 2):
                for t in range(n):
                    qn = torch.hypot(q[t, qh, p], q[t, qh, p + d // 2])
                    kn = torch.hypot(k[t, g, p], k[t, g, p + d // 2])
                    brute[g, p] += qn * kn / n
    torch.testing.assert_close(score_rope_pairs(q, k), brute)


def test_score_rope_matches_conversion_scores_and_kept_pairs():
    model = tiny_model("llama-gqa")
    scores = score_rope(model, calib_ids(), seq_len=64)
    assert scores.shape == (2, 2, HEAD_DIM // 2)
    cfg = MLAConfig(rope_strategy="2-norm", rope_dims=4, kv_rank=8, calib_seq_len=64)
    _, report = convert_to_mla_with_report(model, cfg, calib_ids())
    torch.testing.assert_close(report.rope_scores, scores)
    assert report.rope_pairs[1] == scores[1].topk(2).indices.sort().values.tolist()


def test_rope_and_nope_dims_partition_each_head():
    rope, nope = rope_and_nope_dims(torch.tensor([[0, 3], [1, 2]]), head_dim=8)
    assert rope.tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    assert nope.tolist() == [[1, 2, 5, 6], [0, 3, 4, 7]]


def _layer0_factors(model, cfg):
    """Layer-0 inputs, stacked [k_nope; v] rows and their second moment."""
    captured = {}

    def capture(module, args, kwargs):
        captured["x"] = kwargs["hidden_states"].detach()

    model.model.layers[0].self_attn.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(calib_ids(256)[None])
    x = captured["x"].flatten(0, 1)
    pairs = select_rope_pairs("high", cfg.rope_dims, HEAD_DIM).expand(2, -1)
    src = SourceAttention.split(model.model.layers[0].self_attn, pairs, HEAD_DIM, 2)
    return src, second_moment(x)


@pytest.mark.parametrize("layout_groups", [1, 2])
def test_aware_svd_has_lower_activation_error_than_joint(layout_groups):
    model = tiny_model("llama-gqa")
    with torch.no_grad():  # activations with outlier channels, as in real LLMs
        model.model.layers[0].input_layernorm.weight[:4] = 8.0
    cfg = MLAConfig(rope_dims=4, kv_rank=6)
    src, cov = _layer0_factors(model, cfg)
    w = interleave_heads(src.k_nope, src.v).double()
    errors = {}
    for method in ("joint", "aware"):
        rank = cfg.kv_rank * 2 // layout_groups
        down, up = factor_kv(src.k_nope, src.v, layout_groups, rank, method, Whitening.from_second_moment(cov))
        rows_per_group = w.shape[0] // layout_groups
        approx = torch.cat([up[g] @ down[g * rank : (g + 1) * rank] for g in range(layout_groups)])
        assert approx.shape == (rows_per_group * layout_groups, w.shape[1])
        errors[method] = activation_error(w, approx, cov)
    assert errors["aware"] < 0.9 * errors["joint"], errors


@pytest.mark.parametrize("layout_groups", [1, 2])
def test_output_aware_svd_lowers_the_error_where_the_layer_uses_it(layout_groups):
    """The error of K_nope rows weighted by the queries that read them, of V rows by o_proj: output-aware
    minimises it, plain aware (activations only) does not."""
    model = tiny_model("llama-gqa")
    cfg = MLAConfig(rope_dims=4, kv_rank=6)
    src, cov = _layer0_factors(model, cfg)
    whitening = Whitening.from_second_moment(cov)
    rows = output_weights(src.q[:, :, cfg.rope_dims :], src.v, src.o_proj.weight, whitening)
    w = interleave_heads(src.k_nope, src.v).detach().double()
    rank = cfg.kv_rank * 2 // layout_groups
    errors = {}
    for method in ("aware", "output-aware"):
        with torch.no_grad():
            down, up = factor_kv(src.k_nope, src.v, layout_groups, rank, method, whitening, rows)
        approx = torch.cat([up[g] @ down[g * rank : (g + 1) * rank] for g in range(layout_groups)])
        errors[method] = float((rows.l @ (w - approx) @ whitening.s).square().sum())
    assert errors["output-aware"] < 0.9 * errors["aware"], errors


def test_split_keeps_k_and_v_in_separate_latent_halves():
    src, _ = _layer0_factors(tiny_model("llama-gqa"), MLAConfig(rope_dims=4, kv_rank=8))
    down, up = factor_kv(src.k_nope, src.v, groups=2, rank=8, method="split")
    dn = HEAD_DIM - 4
    assert down.shape == (16, 64) and up.shape == (2, dn + HEAD_DIM, 8)
    assert up[:, :dn, 4:].abs().max() == 0 and up[:, dn:, :4].abs().max() == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_dims=5), "rope_dims=5 must be an even"),
        (dict(rope_dims=0), "rope_dims=0 must be an even"),
        (dict(kv_rank=0), "kv_rank=0 must be a positive"),
        (dict(rope_strategy="middle"), "rope_strategy='middle' is unknown"),
        (dict(svd="qr"), "svd='qr' is unknown"),
        (dict(layout="diagonal"), "layout='diagonal' is unknown"),
        (dict(svd="split", kv_rank=7), "kv_rank=7 must be even for svd='split'"),
    ],
)
def test_bad_config_is_rejected_with_the_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MLAConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rope_dims=18), "rope_dims=18 > head_dim=16"),
        (dict(rope_strategy="2-norm", rope_dims=4, kv_rank=29), r"kv_rank=29 > rows it factors per KV head \(28"),
        (dict(rope_dims=4, kv_rank=33), r"kv_rank=33 > rows it factors per KV head \(32"),  # rotated: all key rows
    ],
)
def test_config_that_does_not_fit_the_model_fails_before_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert_to_mla(tiny_model(), MLAConfig(**kwargs), calib_ids())


def test_empty_calibration_and_unsupported_architecture_fail_early():
    with pytest.raises(ValueError, match="calibration set has 0 tokens"):
        convert_to_mla(tiny_model(), MLAConfig(), torch.empty(0, dtype=torch.long))
    model = tiny_model()
    model.config.model_type = "qwen3"
    with pytest.raises(ValueError, match=r"model_type='qwen3' is not supported.*\['llama', 'mistral', 'qwen2'\]"):
        convert_to_mla(model, MLAConfig(), calib_ids())


def test_sliding_window_model_is_rejected():
    model = tiny_model("mistral-gqa")
    model.config.sliding_window = 32
    with pytest.raises(ValueError, match="sliding_window=32"):
        convert_to_mla(model, MLAConfig(), calib_ids())


def test_conversion_shares_unchanged_modules_instead_of_copying():
    model = tiny_model("llama-gqa")
    mla = convert_to_mla(model, MLAConfig(rope_dims=4, kv_rank=4, calib_seq_len=64), calib_ids())
    assert mla.model.layers[1].mlp is model.model.layers[1].mlp
    assert mla.model.embed_tokens is model.model.embed_tokens
    assert mla.model.layers[0].self_attn.o_proj is model.model.layers[0].self_attn.o_proj
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # the source still works


@pytest.mark.parametrize("source", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("refit", [False, True])
def test_converting_on_copies_of_one_layer_at_a_time_gives_the_same_model(source, refit):
    """`device=`: each layer runs as a copy there (the CPU here: the same path a GPU takes); the weights stay put,
    the converted model is the in-place conversion's, built beside the untouched source and sharing its modules."""
    cfg = MLAConfig(rope_dims=4, kv_rank=4, refit_values=refit, calib_seq_len=64)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(8))
    in_place = convert_to_mla(tiny_model(source), cfg, calib_ids())
    model = tiny_model(source)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    streamed, _ = convert_to_mla_with_report(model, cfg, calib_ids(), device="cpu")
    torch.testing.assert_close(streamed(ids).logits, in_place(ids).logits, atol=0, rtol=0)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert type(model.model.layers[0].self_attn).__name__ != "MLAAttention"  # the source keeps its attention
    assert streamed.model.layers[1].self_attn.o_proj is model.model.layers[1].self_attn.o_proj
    assert streamed.model.layers[1].mlp is model.model.layers[1].mlp


def test_small_decompositions_leave_the_process_thread_count_alone():
    threads = torch.get_num_threads()
    with small_lapack():  # one MKL thread for this thread's decompositions only: the catalog converts on a thread pool
        assert torch.get_num_threads() == threads
        torch.linalg.eigh(torch.eye(64, dtype=torch.float64))
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("source", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("layout", ["per_head", "shared"])
def test_value_refit_fits_each_layers_output_better_than_the_factorisation(source, layout):
    """`refit_values` solves the value up-projection under the converted layer's own attention weights: on the
    calibration windows, the first layer's attention output (same inputs either way) comes closer to the original's."""
    model = tiny_model(source)
    windows = calib_ids().view(-1, 64)  # the conversion's calibration windows (calib_seq_len 64)

    def first_attention_output(m: torch.nn.Module) -> torch.Tensor:
        out = []
        hook = m.model.layers[0].self_attn.register_forward_hook(lambda mod, args, o: out.append(o[0]))
        with torch.no_grad():
            m(windows)
        hook.remove()
        return out[0]

    reference = first_attention_output(model)
    errors = {}
    for refit in (False, True):
        cfg = MLAConfig(rope_dims=4, kv_rank=4, layout=layout, refit_values=refit, calib_seq_len=64)
        mla = convert_to_mla(tiny_model(source), cfg, calib_ids())
        errors[refit] = (first_attention_output(mla) - reference).pow(2).mean().item()
    assert errors[True] < 0.9 * errors[False]
