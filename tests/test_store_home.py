"""The store's folder (`MHA2MLA_HOME`, `--home`): a store copied or moved elsewhere keeps working there, and a
command that only reads says so where there is no store instead of making one."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from flows.cli import app
from pipeline_fixtures import _reset_process_state, make_tiny_params

pytest_plugins = ["pipeline_fixtures"]

PLACES = ("MHA2MLA_ARTIFACT_ROOT", "MHA2MLA_TRACKING_URI", "MHA2MLA_PREFECT_HOME", "MHA2MLA_HOME")


@pytest.fixture
def home_env(monkeypatch, tmp_path):
    """Every place the store's folder decides; the CLI's --home sets MHA2MLA_HOME, undone after the test."""
    for name in PLACES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MHA2MLA_HOME", str(tmp_path / "unset"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    monkeypatch.chdir(tmp_path)
    yield
    _reset_process_state(reopen=False)


def test_read_commands_without_a_store_say_so_and_exit_2(home_env, tmp_path):
    nowhere = tmp_path / "nowhere"
    for args in (("runs",), ("runs", "--json"), ("lineage", "models:/m/1"), ("resume", "0" * 32)):
        result = CliRunner().invoke(app, ["--home", str(nowhere), *args])
        assert result.exit_code == 2, result.output
        assert "no store here" in result.output and "MHA2MLA_HOME" in result.output and "--home" in result.output
    assert not nowhere.exists() and not (tmp_path / ".mha2mla").exists()


@pytest.mark.services
@pytest.mark.slow
def test_a_moved_store_resolves_lineage_resumes_from_its_cache_and_writes_in_its_own_place(
    home_env, prefect_api, mlflow_db_template, tiny_source, tmp_path, monkeypatch, executions
):
    from flows.convert import convert

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    shutil.copyfile(mlflow_db_template, old / "mlflow.db")
    monkeypatch.setenv("MHA2MLA_HOME", str(old))
    _reset_process_state()
    first = convert(make_tiny_params(tiny_source))
    shutil.copytree(old, new)
    shutil.rmtree(old)
    _reset_process_state(reopen=False)

    result = CliRunner().invoke(app, ["--home", str(new), "lineage", f"models:/{first.model_version}", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["producer"]["name"] == "svd-init" and found["key"].startswith("stages/")
    assert found["config"]["mla.kv_rank"] == 4
    in_new_place = new / "artifacts" / found["key"]
    result = CliRunner().invoke(app, ["--home", str(new), "lineage", str(in_new_place), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["producer"]["run_id"] == found["producer"]["run_id"]
    executions.clear()
    result = CliRunner().invoke(app, ["--home", str(new), "resume", first.run_id])
    assert result.exit_code == 0, result.output
    assert not executions and "0 ran, 5 cached" in result.output  # every stage served from the copied cache
    assert f"checkpoint: {(new / 'artifacts').as_uri()}/" in result.output
    client = MlflowClient()
    [latest] = client.search_runs([client.get_experiment_by_name("mha2mla").experiment_id],
                                  "tags.`mha2mla.flow` = 'convert'", order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    assert latest.info.run_id != first.run_id and latest.info.artifact_uri.startswith((new / "mlruns").as_uri())
    assert not old.exists()
