"""Multiple choice through lm-eval: a 10-item local task on a tiny model, MLA models through HFLM, bad input."""

import pytest

from eval_tiny import tiny_lm, tiny_tokenizer, write_arc_items
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.evaluation.multiple_choice import TASK_FILES, TASKS_DIR, MCConfig, run_multiple_choice
from mha2mla_core.evaluation.paths import MC_DATA_DIR
from tiny_models import calib_ids


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_lm(tokenizer), tokenizer


@pytest.fixture
def arc_dir(tmp_path):
    write_arc_items(tmp_path)
    return tmp_path


def test_ten_item_task_is_deterministic_and_in_range(tiny, arc_dir):
    model, tokenizer = tiny
    cfg = MCConfig(tasks=("mha2mla_arc_easy",), data_dir=arc_dir, batch_size=4)
    first = run_multiple_choice(model, tokenizer, cfg)
    second = run_multiple_choice(model, tokenizer, cfg)
    assert first == second
    score = first["arc_easy"]
    assert score.samples == 10
    assert 0 <= score.acc <= 1 and 0 <= score.acc_norm <= 1
    assert score.acc_stderr > 0 and score.acc_norm_stderr > 0


def test_limit_caps_the_items(tiny, arc_dir):
    model, tokenizer = tiny
    scores = run_multiple_choice(model, tokenizer, MCConfig(tasks=("arc_easy",), data_dir=arc_dir, limit=3))
    assert scores["arc_easy"].samples == 3


def test_full_rank_mla_model_scores_like_the_original(tiny, arc_dir):
    model, tokenizer = tiny
    cfg = MLAConfig(rope_dims=16, kv_rank=16, svd="joint", layout="per_head", calib_seq_len=64)
    mla = convert_to_mla(model, cfg, calib_ids())
    assert mla.config.model_type == "mla_llama"
    mc = MCConfig(tasks=("arc_easy",), data_dir=arc_dir, batch_size=4)
    original = run_multiple_choice(model, tokenizer, mc)["arc_easy"]
    converted = run_multiple_choice(mla, tokenizer, mc)["arc_easy"]
    assert (converted.acc, converted.acc_norm) == (original.acc, original.acc_norm)


def test_packaged_tasks_are_all_registered():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {f"mha2mla_{t}" for t in TASK_FILES} <= set(manager.all_tasks)
    assert sum(t.startswith("mha2mla_mmlu_") for t in manager.all_subtasks) == 57


@pytest.mark.slow
@pytest.mark.skipif(not MC_DATA_DIR.is_dir(), reason=f"{MC_DATA_DIR} is not here")
def test_every_task_runs_on_the_shared_data(tiny):
    model, tokenizer = tiny
    scores = run_multiple_choice(model, tokenizer, MCConfig(limit=1))
    assert set(scores) == set(TASK_FILES)
    assert scores["mmlu"].samples == 57 and scores["winogrande"].samples == 1
    assert scores["winogrande"].acc_norm is None and scores["hellaswag"].acc_norm is not None


def test_hub_source_uses_the_upstream_names():
    cfg = MCConfig(tasks=("mha2mla_arc_easy", "mmlu"), source="hub")
    assert cfg.tasks == ("arc_easy", "mmlu")
    assert [cfg.lm_eval_name(t) for t in cfg.tasks] == ["arc_easy", "mmlu"]
    assert MCConfig(tasks=("arc_easy",)).lm_eval_name("arc_easy") == "mha2mla_arc_easy"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(tasks=("arc_hard",)), "unknown multiple-choice task 'arc_hard'; known: arc_challenge, arc_easy"),
        (dict(tasks=()), "no task given"),
        (dict(limit=0), "limit=0 must be >= 1"),
        (dict(limit=-5), "limit=-5"),
        (dict(limit=0.5), "limit=0.5"),
        (dict(source="web"), "source='web'"),
        (dict(batch_size=0), "batch_size=0"),
    ],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MCConfig(**kwargs)


def test_missing_data_file_names_the_path_and_the_fix(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(FileNotFoundError, match=r"piqa\.jsonl.*--mc-data-dir"):
        run_multiple_choice(model, tokenizer, MCConfig(tasks=("piqa",), data_dir=tmp_path))


def test_task_loader_without_a_data_dir_says_how_to_pass_it():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mha2mla_lm_eval_utils", TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    with pytest.raises(ValueError, match="mc_data_dir"):
        utils.load_mc(file="arc_easy.jsonl", version=1.0)
