"""The suite end to end on a tiny model and its MLA conversions: results, JSON round trip, table, plots."""

import json
import logging
import re
from dataclasses import replace

import pytest

from eval_tiny import HAYSTACK, NEEDLE_TEMPLATES, tiny_lm, tiny_tokenizer, write_arc_items
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.evaluation import (
    Comparison,
    EvalConfig,
    EvalResult,
    InferenceConfig,
    MCConfig,
    MCScore,
    NeedleConfig,
    PerplexityConfig,
    compare,
    evaluate_model,
    flat_metrics,
)
from mha2mla_core.evaluation import plots
from mha2mla_core.evaluation.report import mc_summary
from tiny_models import calib_ids

FULL_RANK = MLAConfig(rope_dims=16, kv_rank=16, svd="joint", layout="per_head", calib_seq_len=64)
LOW_RANK = MLAConfig(rope_dims=4, kv_rank=4, svd="joint", layout="per_head", calib_seq_len=64)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "text.txt").write_text(HAYSTACK * 4)
    write_arc_items(data)
    return EvalConfig(
        perplexity=PerplexityConfig(text_path=data / "text.txt", window=16, max_tokens=128),
        multiple_choice=MCConfig(tasks=("arc_easy",), data_dir=data, batch_size=4),
        needle=NeedleConfig(
            haystack_paths=(data / "text.txt",), lengths=(24, 40), depths=(0.0, 1.0), passkey_digits=1,
            max_new_tokens=2, **NEEDLE_TEMPLATES,
        ),  # fmt: skip
        inference=InferenceConfig(contexts=(16,), batch_sizes=(1, 2), decode_steps=3),
    )


@pytest.fixture(scope="module")
def results(suite):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, "llama-mha")
    return {
        "original": evaluate_model(model, tokenizer, suite, "original"),
        "mla-full": evaluate_model(convert_to_mla(model, FULL_RANK, calib_ids()), tokenizer, suite, "mla-full"),
        "mla-r4": evaluate_model(convert_to_mla(model, LOW_RANK, calib_ids()), tokenizer, suite, "mla-r4"),
    }


def test_every_stage_ran(results):
    original = results["original"]
    assert original.model_type == "llama" and results["mla-full"].model_type == "mla_llama"
    assert original.perplexity.predicted_tokens == 127
    assert set(original.multiple_choice) == {"arc_easy"}
    assert len(original.needle.trials) == 2 * 2 * 2
    assert len(original.inference) == 2
    assert set(original.seconds) == {"perplexity", "multiple_choice", "needle", "inference"}
    assert original.kv_bytes_per_token_reported is None
    assert results["mla-r4"].kv_bytes_per_token == results["mla-r4"].kv_bytes_per_token_reported


def test_json_round_trip(results):
    for result in results.values():
        assert EvalResult.from_json(result.to_json()) == result


def test_comparison_deltas(results):
    table = compare(results)
    rows = {r.metric: r for r in table.rows}
    ppl = next(r for r in table.rows if r.kind == "ppl")
    assert ppl.deltas["original"] == 0 and abs(ppl.deltas["mla-full"]) < 1e-3
    assert rows["arc_easy acc"].deltas["mla-full"] == 0
    assert rows["KV bytes/token"].values["original"] == 2 * 2 * 4 * 16 * 4  # layers x (K, V) x Hkv x D x fp32
    assert rows["KV bytes/token"].values["mla-r4"] == 2 * 4 * (4 + 4) * 4  # layers x Hkv x (R + Dr) x fp32
    assert rows["KV bytes/token"].deltas["mla-r4"] == pytest.approx(-75.0)
    data = json.loads(table.to_json())
    assert data["baseline"] == "original" and data["models"] == ["original", "mla-full", "mla-r4"]


def test_markdown_table(results):
    text = compare(results).to_markdown()
    lines = text.splitlines()
    assert lines[0] == "| metric | original | mla-full | mla-r4 |"
    kv = next(line for line in lines if line.startswith("| KV bytes/token"))
    assert kv == "| KV bytes/token | 1,024 | 1,024 (+0.0%) | 256 (-75.0%) |"
    assert any(line.startswith("| arc_easy acc |") and "±" in line for line in lines)
    assert results["original"].to_markdown().startswith("| metric | original |")


def test_flat_metrics_are_the_table_by_key(results):
    table = compare(results)
    flat = flat_metrics(results["mla-r4"])
    assert {row.key: row.values["mla-r4"] for row in table.rows}.items() <= flat.items()
    assert flat["mc.arc_easy.samples"] == 10 and 0 < flat["mc.arc_easy.acc_stderr"] < 100
    assert flat["predicted_tokens"] == 127 and flat["kv_bytes_per_token"] == 256
    assert {"speed.b2_t16.decode_tok_s", "needle.acc.len40", "seconds.needle"} <= set(flat)
    assert all(re.fullmatch(r"[/\w.\- :]+", key) for key in flat)  # names MLflow accepts


def test_table_round_trips_through_json_and_takes_another_column(results):
    table = compare(results)
    back = Comparison.from_dict(json.loads(table.to_json()))
    assert back == table
    more = back.with_model("reloaded", {"kv_bytes_per_token": 512.0})
    assert more.row("kv_bytes_per_token").deltas["reloaded"] == pytest.approx(-50.0)
    assert more.row("ppl").values["reloaded"] is None and more.row("ppl").values["mla-r4"] == table.row("ppl").values["mla-r4"]
    header, *body = more.cells()
    assert header == ["metric", "original", "mla-full", "mla-r4", "reloaded"] and len(body) == len(table.rows)
    with pytest.raises(KeyError, match="no metric 'nope'"):
        more.row("nope")


def test_kv_probe_reads_the_cache_without_other_stages():
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer, "llama-mha")
    mla = convert_to_mla(model, LOW_RANK, calib_ids())
    probe_only = EvalConfig(perplexity=None, multiple_choice=None, needle=None, inference=None, kv_probe_tokens=8)
    original = evaluate_model(model, tokenizer, probe_only)
    assert original.kv_bytes_per_token_probe == original.kv_bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert evaluate_model(mla, tokenizer, probe_only).kv_bytes_per_token == 2 * 4 * (4 + 4) * 4
    assert EvalResult.from_json(original.to_json()) == original and original.seconds.keys() == {"kv_probe"}
    with pytest.raises(ValueError, match="kv_probe_tokens=0"):
        EvalConfig(kv_probe_tokens=0)


def test_compare_needs_a_known_baseline(results):
    with pytest.raises(ValueError, match="baseline='nope'"):
        compare(results, baseline="nope")
    with pytest.raises(ValueError, match="at least one"):
        compare({})


def test_plots_are_png(results):
    for png in (
        plots.needle_heatmap(results["original"].needle, "original"),
        plots.decode_speed(results),
        plots.kv_cache(results),
    ):
        assert png.startswith(b"\x89PNG")


def test_missing_inputs_fail_before_any_model_work(suite, tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_lm(tokenizer)
    bad = replace(suite, needle=replace(suite.needle, haystack_paths=(tmp_path / "gone.txt",)))
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        evaluate_model(model, tokenizer, bad)
    bad = replace(suite, perplexity=PerplexityConfig(text_path=tmp_path / "none.txt"))
    with pytest.raises(FileNotFoundError, match="none.txt"):
        evaluate_model(model, tokenizer, bad)


def test_commonsense_average_reads_acc_norm_and_winogrande_acc():
    tasks = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "winogrande")
    scores = {t: MCScore(t, acc=0.3, acc_stderr=0.01, acc_norm=None if t == "winogrande" else 0.6,
                         acc_norm_stderr=None, samples=10) for t in tasks}  # fmt: skip
    result = EvalResult("m", "llama", 1, "float32", "cpu", multiple_choice=scores)
    assert flat_metrics(result)["mc.commonsense_avg"] == pytest.approx(100 * (5 * 0.6 + 0.3) / 6)
    assert mc_summary(scores).endswith("piqa 60.0, openbookqa 60.0, winogrande 30.0, six-task average 55.0")
    del scores["piqa"]  # an average of five tasks is no six-task average
    assert "mc.commonsense_avg" not in flat_metrics(result)
    assert mc_summary(scores) == "arc_easy 60.0, arc_challenge 60.0, hellaswag 60.0, openbookqa 60.0, winogrande 30.0"


def test_the_log_keeps_the_multiple_choice_scores_before_the_later_stages(suite, caplog):
    """A run cut off in the needle or inference stage still leaves its multiple-choice figures in the log."""
    tokenizer = tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="mha2mla_core.evaluation.suite"):
        result = evaluate_model(tiny_lm(tokenizer), tokenizer, replace(suite, perplexity=None, needle=None,
                                                                          inference=None), "tiny")  # fmt: skip
    score = 100 * result.multiple_choice["arc_easy"].acc_norm
    assert f"tiny: multiple choice: arc_easy {score:.1f}" in caplog.text
