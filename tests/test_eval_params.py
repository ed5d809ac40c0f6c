"""The evaluate stage's parameters: their mapping onto the core evaluation configs, the cache key, and bad input
(rejected when the parameters are built or, for lengths and files, before any stage runs)."""

from __future__ import annotations

import pytest

from eval_tiny import write_arc_items
from mha2mla_core.evaluation.multiple_choice import TASK_FILES
from infra.stage import cache_payload
from tasks.evaluate import EvalParams, check_eval_inputs
from tasks.inputs import resolve_model

pytest_plugins = ["pipeline_fixtures"]


def test_defaults_run_only_perplexity_and_the_kv_probe():
    suite = EvalParams().suite()
    assert suite.multiple_choice is None and suite.needle is None and suite.inference is None
    assert (suite.perplexity.window, suite.perplexity.max_tokens, suite.kv_probe_tokens) == (512, 4096, 1024)


def test_suites_map_onto_the_core_configs(tmp_path):
    params = EvalParams(mc_tasks=["mha2mla_piqa", "arc_easy", "piqa"], mc_limit=3, mc_data_dir=str(tmp_path),
                        needle={"lengths": [64], "haystack": "hay.txt"}, speed={"contexts": [32], "repeats": 2})  # fmt: skip
    suite = params.suite()
    assert suite.multiple_choice.tasks == ("piqa", "arc_easy") and suite.multiple_choice.limit == 3
    assert suite.multiple_choice.data_dir == tmp_path
    assert suite.needle.lengths == (64,) and [p.name for p in suite.needle.haystack_paths] == ["hay.txt"]
    assert suite.inference.contexts == (32,) and suite.inference.repeats == 2 and suite.inference.batch_sizes == (1, 4)
    assert EvalParams(mc_tasks=["all"]).mc_tasks == tuple(TASK_FILES)


def test_every_suite_parameter_is_in_the_cache_key():
    base = cache_payload(EvalParams())
    for change in ({"mc_tasks": ["piqa"]}, {"mc_tasks": ["piqa"], "mc_limit": 5}, {"needle": {}},
                   {"needle": {"trials": 2}}, {"speed": {}}, {"speed": {"decode_steps": 4}}):  # fmt: skip
        assert cache_payload(EvalParams(**change)) != base, change
    assert cache_payload(EvalParams(mc_tasks=["mha2mla_piqa"])) == cache_payload(EvalParams(mc_tasks=["piqa"]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mc_tasks": ["arc_eazy"]}, "unknown multiple-choice task 'arc_eazy'; known: arc_challenge, arc_easy"),
        ({"mc_tasks": ["piqa"], "mc_limit": 0}, "mc_limit=0: give at least 1 item per task"),
        ({"mc_limit": 5}, "mc_tasks is empty; name the tasks to score (--mc-tasks arc_easy,piqa)"),
        ({"needle": {"lengths": [0, 512]}}, "lengths=(0, 512) must be a non-empty list of positive token counts"),
        ({"needle": {"depths": [1.5]}}, "depths=(1.5,) must be a non-empty list of fractions in [0, 1]"),
        ({"needle": {"lenghts": [512]}}, "needle.lenghts"),
        ({"speed": {"batch_sizes": []}}, "batch_sizes=() must be a non-empty list of positive integers"),
        ({"speed": {"decode_steps": 0}}, "decode_steps=0 must be >= 1"),
    ],
)
def test_bad_parameters_are_rejected_with_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError) as error:
        EvalParams(**fields)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"needle": {"lengths": [256, 600]}},
         "lengths up to 600 + max_new_tokens=8 = 608 tokens exceed the model's max_position_embeddings=512; use lengths <= 504"),
        ({"speed": {"contexts": [512], "decode_steps": 16}},
         "contexts up to 512 + decode_steps=16 = 528 tokens exceed the model's max_position_embeddings=512; use contexts <= 496"),
    ],
)  # fmt: skip
def test_lengths_beyond_the_model_fail_before_any_stage(tiny_source, fields, message):
    with pytest.raises(ValueError) as error:
        check_eval_inputs(resolve_model(str(tiny_source)), EvalParams(**fields))
    assert message in str(error.value)


def test_missing_data_fails_before_any_stage(tiny_source, tmp_path):
    model = resolve_model(str(tiny_source))
    with pytest.raises(FileNotFoundError, match="data file for task 'piqa' not found"):
        check_eval_inputs(model, EvalParams(mc_tasks=["piqa"], mc_data_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="haystack text .*gone.txt does not exist"):
        check_eval_inputs(model, EvalParams(needle={"lengths": [64], "haystack": str(tmp_path / "gone.txt")}))
    write_arc_items(tmp_path)
    (tmp_path / "hay.txt").write_text("some text.")
    check_eval_inputs(model, EvalParams(mc_tasks=["arc_easy"], mc_data_dir=str(tmp_path),
                                        needle={"lengths": [64], "haystack": str(tmp_path / "hay.txt")}))  # fmt: skip


def test_catalog_evaluation_section_is_checked(tmp_path):
    from flows.catalog import load_catalog

    file = tmp_path / "catalog.yaml"
    good = "evaluation: {mc_tasks: [arc_easy, piqa], mc_limit: 20, needle: {lengths: [1024]}, speed: {}}"
    file.write_text(f"models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n        {good}\n")
    [entry] = load_catalog(file)[1]
    assert entry.evaluation.mc_tasks == ("arc_easy", "piqa") and entry.evaluation.needle.lengths == (1024,)
    file.write_text("models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n        evaluation: {mc_tasks: [piqaa]}\n")
    with pytest.raises(ValueError, match="unknown multiple-choice task 'piqaa'"):
        load_catalog(file)
