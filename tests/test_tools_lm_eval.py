"""lm-eval's own command line on a converted checkpoint: `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` with the packaged local tasks, in a subprocess that never imports mha2mla_core,
scores what the pipeline's in-process evaluation scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval_tiny import tiny_lm, tiny_tokenizer, write_arc_items
from mha2mla_core import MLAConfig, convert_to_mla
from mha2mla_core.evaluation.multiple_choice import MCConfig, run_multiple_choice
from mha2mla_core.hub_code import bundle_code
from tiny_models import calib_ids

pytestmark = pytest.mark.slow

TASKS_DIR = Path(__file__).resolve().parents[1] / "mha2mla_core" / "lm_eval_tasks"
LIMIT = 6


def lm_eval_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The `lm_eval` console script of this environment, with nothing of the repository on its path."""
    script = Path(sys.executable).with_name("lm_eval")
    env = {"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(cwd / "hf_home"), "HF_MODULES_CACHE": str(cwd / "hf_modules")}  # fmt: skip
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_plain_lm_eval_cli_scores_a_converted_checkpoint(tmp_path):
    tok = tiny_tokenizer()
    mla = convert_to_mla(tiny_lm(tok), MLAConfig(rope_dims=4, kv_rank=4, svd="aware", calib_seq_len=64),
                         calib_ids(512).clamp(max=len(tok) - 1)).eval()  # fmt: skip
    checkpoint = tmp_path / "mla"
    mla.save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    bundle_code(checkpoint)
    write_arc_items(tmp_path)

    done = lm_eval_cli(
        "--model", "hf", "--model_args", f"pretrained={checkpoint},trust_remote_code=True,dtype=float32",
        "--include_path", str(TASKS_DIR), "--metadata", json.dumps({"mc_data_dir": str(tmp_path)}),
        "--tasks", "mha2mla_arc_easy", "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "4",
        "--output_path", str(tmp_path / "results"), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    cli = results["results"]["mha2mla_arc_easy"]
    assert results["n-samples"]["mha2mla_arc_easy"]["effective"] == LIMIT

    ours = run_multiple_choice(mla, tok, MCConfig(tasks=("arc_easy",), data_dir=tmp_path, limit=LIMIT))["arc_easy"]
    assert (cli["acc,none"], cli["acc_norm,none"]) == pytest.approx((ours.acc, ours.acc_norm))


def test_tasks_without_their_data_dir_name_the_metadata_to_pass(tmp_path):
    done = lm_eval_cli("--model", "dummy", "--include_path", str(TASKS_DIR), "--tasks", "mha2mla_arc_easy",
                       "--limit", "1", cwd=tmp_path)  # fmt: skip
    assert done.returncode != 0
    assert "lm_eval --metadata '{\"mc_data_dir\": \"DIR\"}'" in done.stderr and "mha2mla evaluate" not in done.stderr
