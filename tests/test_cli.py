"""The `mha2mla` command line on a tiny seeded Llama (in-process typer runner; the reload check is a real
subprocess), on the session's Prefect test server with MLflow and artifacts in a temp dir."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from mlflow import MlflowClient
from typer.testing import CliRunner

from eval_tiny import write_arc_items
from flows.cli import app
from flows.convert import ConvertParams
from flows.naming import config_tag

pytest_plugins = ["pipeline_fixtures"]
pytestmark = [pytest.mark.services, pytest.mark.slow]

TINY = ["--rope-dims", "4", "--kv-rank", "4", "--calib-tokens", "512", "--eval-tokens", "256"]


@pytest.fixture
def cli(local_env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps long URIs at the default 80

    def invoke(*args: str, code: int = 0) -> str:
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result.stdout if "--json" in args else result.output  # --json: stdout holds the JSON alone

    return invoke


@pytest.fixture
def seen(monkeypatch) -> dict:
    """`convert` stops once its params are built; seen["params"] holds them (the flow is tested in test_flow)."""
    seen = {}

    def capture(ctx, flow, params):
        seen["params"] = params
        raise SystemExit(0)

    monkeypatch.setattr("flows.cli.run_with_progress", capture)
    return seen


def latest_flow_run():
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`mha2mla.flow` = 'convert'", order_by=["attributes.start_time DESC"])[0]


def test_convert_reloads_in_a_fresh_process_then_runs_lineage_resume(cli, tiny_source, tmp_path):
    write_arc_items(tmp_path)
    suites = ["--mc-tasks", "arc_easy", "--mc-limit", "5", "--mc-data-dir", str(tmp_path), "--speed-contexts", "16,32"]
    out = cli("convert", str(tiny_source), *TINY, *suites)
    assert "mla, reloaded (fresh process)" in out and "greedy sample (MLAForCausalLM, reloaded)" in out
    assert "arc_easy acc" in out and "decode tok/s B=4 T=32" in out and "KV bytes/token" in out
    stages = int(re.search(r"stages: (\d+) ran, 0 cached", out).group(1))  # 2-norm adds score-rope to the four
    assert stages >= 4
    run = latest_flow_run()
    assert 0 <= run.data.metrics["mc_avg_acc"] <= 100 and "mc_avg_acc_original" in run.data.metrics  # in %
    checkpoint = MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")[0].tags["mha2mla.checkpoint_uri"]

    out = cli("lineage", checkpoint)
    assert run.data.tags["mha2mla.model_digest"] in out and "dataset calibration" in out
    assert "config mla.kv_rank" in out and "svd-init" in out

    out = cli("runs")
    assert run.info.run_id in out and "svd-init: finished (miss)" in out

    out = cli("resume", run.info.run_id)
    assert f"0 ran, {stages} cached" in out


def test_json_outputs_full_ids_and_a_recipe_that_reproduces_the_checkpoint(cli, tiny_source, tmp_path):
    outcome = json.loads(cli("convert", str(tiny_source), *TINY, "--no-check", "--champion-max-ppl", "1e9", "--json"))
    run_id, (name, version) = outcome["run_id"], outcome["model_version"].split("/")
    assert re.fullmatch(r"[0-9a-f]{32}", run_id) and outcome["reloaded"] is None
    client = MlflowClient()
    parent = client.get_run(run_id)
    assert parent.data.metrics["ppl"] > 0 and parent.data.metrics["kv_saving_pct"] > 0
    assert "seconds.svd-init" in parent.data.metrics and parent.data.tags["mha2mla.gate"] == "passed"
    assert sorted(client.get_model_version(name, version).aliases) == ["candidate", "champion"]
    assert name == parent.info.run_name == f"{tiny_source.name}-mla-{config_tag(ConvertParams(model='m', mla={'rope_dims': 4, 'kv_rank': 4}))}"
    with get_client(sync_client=True) as prefect:  # Prefect's runs carry the same name, each task its role
        flow_run = prefect.read_flow_run(parent.data.tags["mha2mla.prefect_flow_run"])
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.name == name
    assert {t.name for t in tasks} == set(outcome["cache"]) and {"svd-init", "evaluate[original]", "evaluate[mla]"} <= set(outcome["cache"])

    [listed] = [r for r in json.loads(cli("runs", "--json")) if r["run"]["run_id"] == run_id]
    assert [s["name"] for s in listed["stages"]][0] == "sample-calibration" and len(listed["stages"]) == len(outcome["cache"])
    by_registry = json.loads(cli("lineage", f"models:/{name}/{version}", "--json"))
    by_alias = json.loads(cli("lineage", f"models:/{name}@champion", "--json"))
    assert by_registry["producer"]["name"] == by_alias["producer"]["name"] == "svd-init"
    assert by_registry["sha256"] == outcome["checkpoint"]["sha256"] and len(by_registry["sha256"]) == 64
    assert by_registry["config"]["mla.kv_rank"] == 4 and by_registry["model_versions"] == [f"{name}/{version}"]

    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    folder = downloaded / "artifacts" / "checkpoint"
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "trust_remote_code=True" in card and "| kv_rank | 4 |" in card
    assert run_id in card and "| calibration |" in card and "mha2mla convert --config recipe.yaml" in card
    assert (folder / "modeling_mla.py").is_file() and (folder / "model.safetensors").is_file()

    again = json.loads(cli("convert", "--config", str(folder / "recipe.yaml"), "--no-check", "--json"))
    assert again["checkpoint"] == outcome["checkpoint"] and set(again["cache"].values()) == {"hit"}
    assert again["model_version"] == outcome["model_version"]  # the same checkpoint keeps its version


def test_catalog_run_reports_each_entry_and_fails_when_one_does(cli, tiny_source, tmp_path):
    file = tmp_path / "catalog.yaml"
    file.write_text(
        "max_concurrency: 1\n"
        "defaults: {mla: {rope_dims: 4, calib_seq_len: 64}, calibration: {num_tokens: 512}, evaluation: {max_tokens: 256, window: 64},"
        " gate: {max_ppl: 1.0e9}}\n"
        f"models:\n  - model: {tiny_source}\n    configs:\n      - {{name: ok, mla: {{kv_rank: 4}}, export: {{check_tokens: 64}}}}\n"
        "      - {name: too-big, mla: {kv_rank: 60, svd: joint}}\n"
    )
    out = cli("catalog", "run", str(file), code=1)
    assert "catalog summary" in out and "ok" in out and "kv_rank=60" in out
    assert "exportfile://" in re.sub(r"[\s│]", "", out)  # the export's URI under the checkpoint's, folded, never cut

    summary = json.loads(cli("catalog", "run", str(file), "--json", code=1))  # a rerun: the ok entry is cached
    assert re.fullmatch(r"[0-9a-f]{32}", summary["run_id"]) and summary["failed"] == 1
    ok, failed = summary["rows"]
    assert (ok["status"], failed["status"]) == ("ok", "failed") and "kv_rank=60" in failed["error"]
    assert ok["export"].startswith("file://") and "export" not in failed
    version = MlflowClient().get_model_version_by_alias(ok["entry"], "champion")  # the catalog's gate passed
    assert version.tags["mha2mla.checkpoint_uri"] == ok["checkpoint"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("convert", "{tiny}", "--rope-dims", "7"), "rope_dims=7 must be an even number"),
        (("convert", "{tiny}", "--kv-rank", "sixteen"), "'sixteen': give a rank per KV head"),
        (("convert", "no-such-org/no-such-model"), "unknown model 'no-such-org/no-such-model'"),
        (("convert", "{tiny}", "--calib-data", "/no/such/file.jsonl"), "no such file or directory"),
        (("convert", "{tiny}", "--mc-tasks", "arc_easy,arc_eazy"), "unknown multiple-choice task 'arc_eazy'; known:"),
        (("convert", "{tiny}", "--mc-limit", "20"), "mc_tasks is empty; name the tasks to score"),
        (("convert", "{tiny}", "--needle-lengths", "1024"), "exceed the model's max_position_embeddings=512"),
        (("convert", "{tiny}", "--finetune-data", "{tiny}", "--synthetic-fraction", "1.5"), "synthetic_fraction"),
        (("convert", "{tiny}", "--finetune-data", "{tiny}", "--finetune-lr", "0"), "lr=0.0 must be > 0"),
        (("convert", "{tiny}", "--synthetic-fraction", "0.5"), "leaves 50% of the rows to real text, but no data"),
        (("convert", "{tiny}", "--finetune-tokens", "4096", "--kd-weight", "0.5"),
         "--finetune-tokens, --kd-weight set, but fine-tuning is off: give --finetune-data"),
        (("convert", "{tiny}", "--finetune-data", "{tiny}", "--trainable", "mlp"),
         "finetune.train.trainable: Input should be 'all', 'attention' or 'attention+norms' (got 'mlp')"),
        (("convert", "{tiny}", "--export-kv-block", "32"), "--export-kv-block set, but nothing is exported"),
        (("lineage", "file:///no/such/checkpoint"), "no run logged output"),
        (("resume", "0123456789abcdef0123456789abcdef"), "no MLflow run"),
    ],
)
def test_bad_input_is_one_clear_line(cli, tiny_source, args, message):
    out = cli(*(a.format(tiny=tiny_source) for a in args), code=2)
    assert message in out and "Traceback" not in out and "errors.pydantic.dev" not in out


def test_calibration_and_finetune_options_reach_the_stage_configs(cli, tiny_source, seen):
    cli("convert", str(tiny_source), "--finetune-data", "text.txt", "--finetune-tokens", "4096", "--finetune-lr", "3e-4",
        "--kd-weight", "0.5", "--trainable", "attention", "--finetune-seq-len", "256", "--finetune-batch", "4",
        "--grad-accum", "2", "--synthetic-fraction", "0.25", "--calib-model-samples")  # fmt: skip
    assert seen["params"].calibration.model_samples is True
    finetune = seen["params"].finetune
    assert finetune.synthetic_fraction == 0.25
    train = finetune.train
    assert (train.max_tokens, train.lr, train.kd_weight, train.trainable) == (4096, 3e-4, 0.5, "attention")
    assert (train.seq_len, train.micro_batch_size, train.grad_accum_steps) == (256, 4, 2)


def test_export_options_reach_the_export_params(cli, tiny_source, seen):
    from tasks.export import ExportParams

    cli("convert", str(tiny_source), "--export-target", "llamacpp", "--export-kv-block", "32")
    assert seen["params"].export == ExportParams(target="llamacpp", kv_block=32)
    cli("convert", str(tiny_source), "--export-target", "hf")
    assert seen["params"].export == ExportParams(target="hf")


def test_synthetic_fraction_one_fine_tunes_data_free_without_finetune_data(cli, tiny_source, seen):
    cli("convert", str(tiny_source), "--synthetic-fraction", "1", "--calib-model-samples")
    finetune = seen["params"].finetune
    assert finetune is not None and finetune.data is None and finetune.synthetic_fraction == 1
    assert finetune.reconstruct.steps == 300  # block-wise reconstruction first, by default
    cli("convert", str(tiny_source), "--synthetic-fraction", "1", "--reconstruct-steps", "0")
    assert seen["params"].finetune.reconstruct is None
    cli("convert", str(tiny_source), "--synthetic-fraction", "1", "--reconstruct-steps", "50")
    assert seen["params"].finetune.reconstruct.steps == 50


def test_a_worker_runs_its_device_s_recipe_unless_told_otherwise(cli, tiny_source, seen, monkeypatch):
    monkeypatch.delenv("MHA2MLA_RECIPE")  # the tests' environment turns recovery off; a worker's default is auto
    cli("convert", str(tiny_source))  # a CPU worker: the cpu recipe, a short reconstruction on the calibration
    params = seen["params"]
    assert params.finetune is None and not params.reconstruct.bf16
    assert (params.reconstruct.steps, params.reconstruct.micro_batch_size) == (100, 1)
    assert params.calibration.model_samples  # data-free calibration: the original's own continuations
    assert params.mla.kv_rank == 64 and (params.quantize_kv.nbits, params.quantize_kv.backend) == (4, "hqq")
    cli("convert", str(tiny_source), "--reconstruct-steps", "20")
    assert seen["params"].reconstruct.steps == 20 and seen["params"].finetune is None
    cli("convert", str(tiny_source), "--recipe", "cpu", "--kv-rank", "16", "--kv-bits", "0")  # the engines' budget
    assert seen["params"].mla.kv_rank == 16 and seen["params"].quantize_kv is None
    cli("convert", str(tiny_source), "--recipe", "cpu", "--kv-bits", "2")
    assert (seen["params"].quantize_kv.nbits, seen["params"].quantize_kv.backend) == (2, "hqq")
    cli("convert", str(tiny_source), "--recipe", "cpu", "--reconstruct-steps", "0")
    assert seen["params"].reconstruct is None
    monkeypatch.setenv("MHA2MLA_RECIPE", "none")  # a worker pool that only converts
    cli("convert", str(tiny_source))
    assert seen["params"].reconstruct is None and seen["params"].finetune is None
    monkeypatch.delenv("MHA2MLA_RECIPE")
    monkeypatch.setattr("tasks.inputs.worker_device", lambda setting: torch.device("cuda"))
    cli("convert", str(tiny_source))
    params = seen["params"]
    assert params.reconstruct is None and params.finetune.reconstruct.steps == 300
    assert params.calibration.model_samples and params.finetune.data is None and params.finetune.synthetic_fraction == 1
    train = params.finetune.train
    assert (train.max_tokens, train.lr, train.hidden_weight, train.decay_frac) == (20_000_000, 3e-4, 5.0, 0.5)
    assert params.mla.kv_rank == 64 and (params.quantize_kv.nbits, params.quantize_kv.backend) == (4, "hqq")
    cli("convert", str(tiny_source), "--recipe", "none")
    assert seen["params"].finetune is None
    cli("convert", str(tiny_source), "--finetune-data", "text.txt")  # the command says how to fine-tune: no recipe
    assert seen["params"].finetune.train.hidden_weight == 0.0 and not seen["params"].calibration.model_samples
    cli("convert", str(tiny_source), "--recipe", "gpu", "--finetune-tokens", "32768", "--reconstruct-steps", "0")
    finetune = seen["params"].finetune
    assert (finetune.train.max_tokens, finetune.train.hidden_weight, finetune.reconstruct) == (32768, 5.0, None)
    cli("convert", str(tiny_source), "--recipe", "gpu", "--finetune-data", "text.txt")  # the recipe, on the text
    finetune = seen["params"].finetune
    assert (finetune.synthetic_fraction, finetune.train.hidden_weight) == (0.0, 5.0) and finetune.data is not None
    cli("convert", str(tiny_source), "--recipe", "gpu", "--finetune-data", "text.txt", "--synthetic-fraction", "0.5")
    assert seen["params"].finetune.synthetic_fraction == 0.5
    assert "packaged recipe (cpu, gpu)" in cli("convert", str(tiny_source), "--recipe", "fast", code=2)


def test_catalog_typo_is_reported_before_anything_runs(cli, tmp_path):
    file = tmp_path / "typo.yaml"
    file.write_text("models:\n  - model: smollm2-135m\n    configs:\n      - name: a\n        mla: {kv_rnak: 8}\n")
    out = cli("catalog", "run", str(file), code=2)
    assert "mla.kv_rnak: Unexpected keyword argument (got 8)" in out and "errors.pydantic.dev" not in out


def test_read_only_commands_in_a_folder_without_a_store_say_so_and_create_nothing(cli, monkeypatch, tmp_path):
    missing = tmp_path / "elsewhere" / "mlflow.db"
    monkeypatch.setenv("MHA2MLA_TRACKING_URI", f"sqlite:///{missing}")
    for args in (("runs",), ("runs", "--json"), ("lineage", "models:/some-model/1"), ("resume", "0" * 32)):
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 2 and f"no store here: {missing} does not exist" in result.output, result.output
    assert not missing.parent.exists()


def test_debug_shows_the_traceback_that_a_plain_run_keeps_to_one_line(cli, tiny_source, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a fault of ours")

    monkeypatch.setattr("flows.convert.convert", broken)
    plain = CliRunner().invoke(app, ["convert", str(tiny_source), "--no-check"])
    assert plain.exit_code == 1 and "RuntimeError: a fault of ours (--debug shows the traceback)" in plain.output
    debug = CliRunner().invoke(app, ["--debug", "convert", str(tiny_source), "--no-check"])
    assert isinstance(debug.exception, RuntimeError) and "a fault of ours" in str(debug.exception)
