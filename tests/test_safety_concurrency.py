"""Runs at the same time: on one fresh MLflow database, one fresh Prefect home, one store (subprocesses where the
collision is between processes; tiny seeded Llama for the flows)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pipeline_fixtures import write_tiny_catalog

pytest_plugins = ["pipeline_fixtures"]

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def start_together(script: str, args: list[list[str]], go: Path) -> list[subprocess.Popen]:
    """Start one process per argument list, each importing what it needs and then waiting for `go`."""
    waiting = f"import sys, time\nfrom pathlib import Path\nwhile not Path({str(go)!r}).exists(): time.sleep(0.01)\n"
    procs = [subprocess.Popen([sys.executable, "-c", waiting + textwrap.dedent(script), *a], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args]  # fmt: skip
    time.sleep(1.0)
    go.touch()
    return procs


CONFIGURE = """
from infra.settings import Settings
from infra.tracking import configure
print(configure(Settings(_env_file=None, tracking_uri=f"sqlite:///{sys.argv[1]}", artifact_root=sys.argv[2])))
"""


@pytest.mark.slow
def test_cold_mlflow_database_is_created_by_one_process_at_a_time(tmp_path):
    db = tmp_path / "mlflow.db"
    procs = start_together(CONFIGURE, [[str(db), str(tmp_path / "a")]] * 3, tmp_path / "go")
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, the same id for all


@pytest.mark.services
@pytest.mark.slow
def test_catalog_entries_that_share_stages_run_at_once(local_env, tiny_source, tmp_path):
    """Two entries at once share sample-calibration, score-rope and evaluate[original] (one cache key each, and
    evaluate's result differs per writer: it holds timings); every entry must succeed, every artifact verify."""
    from flows.catalog import catalog
    from infra.stage import context

    file = write_tiny_catalog(tmp_path / "catalog.yaml", tiny_source, """
        {name: k4, mla: {kv_rank: 4}}
        {name: k2, mla: {kv_rank: 2}}
    """)
    outcome = catalog(str(file))
    assert outcome.failed == 0, outcome.rows
    store = context().store
    for row in outcome.rows:
        assert store.exists(row["checkpoint"])
    assert not list((local_env / ".tmp").iterdir())


@pytest.mark.slow
def test_two_cold_converts_in_one_directory_both_succeed(tiny_source, tmp_path):
    """`mha2mla convert` twice at once in a fresh directory, on the embedded default: one MLflow database, one
    Prefect home, one store, the same cache keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MHA2MLA_", "PREFECT_"))}
    env.update(PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="200")
    command = [sys.executable, "-c", "from flows.cli import app; app()", "convert", str(tiny_source), "--rope-dims", "4",
               "--kv-rank", "4", "--calib-tokens", "512", "--eval-tokens", "256", "--no-check"]  # fmt: skip
    clis = [subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]  # fmt: skip
    outputs = [cli.communicate(timeout=600)[0] for cli in clis]
    for cli, out in zip(clis, outputs):
        assert cli.returncode == 0, out[-3000:]
        assert "checkpoint: file://" in out
