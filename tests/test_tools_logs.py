"""Progress outside a terminal and logs in Prefect: `mha2mla convert` piped prints a plain line per stage event as it
happens, and the flow run's logs on the Prefect API hold the stage lines and the core's own INFO lines."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, LogFilter, LogFilterFlowRunId

pytest_plugins = ["pipeline_fixtures"]
pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_piped_convert_prints_plain_stage_lines_and_prefect_keeps_the_run_logs(prefect_api, mlflow_db_template,
                                                                                 tiny_source, tmp_path):  # fmt: skip
    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "prefect"),
           "MHA2MLA_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "MHA2MLA_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "MHA2MLA_PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}  # fmt: skip
    for name in ("PREFECT_LOGGING_LEVEL", "COLUMNS"):
        env.pop(name, None)
    script = Path(sys.executable).with_name("mha2mla")
    command = [str(script), "convert", str(tiny_source), "--rope-dims", "4", "--kv-rank", "4", "--calib-tokens", "512",
               "--eval-tokens", "256", "--no-check", "--name", f"logs-{tmp_path.name}"]  # fmt: skip
    arrivals = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) as proc:
        for line in proc.stdout:
            arrivals.append((time.monotonic(), line.rstrip("\n")))
        stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr[-3000:]
    end = time.monotonic()
    lines = [line for _, line in arrivals]
    stage_lines = [line.split(" ", 1)[1] for line in lines if re.match(r"\d\d:\d\d:\d\d \S+: ", line)]
    assert stage_lines[:2] == ["sample-calibration: started", "sample-calibration: done"]
    assert stage_lines.index("svd-init: started") + 1 == stage_lines.index("svd-init: done")
    assert "evaluate[mla]: done" in stage_lines and not any("running" in line for line in lines)  # no live display
    first = next(t for t, line in arrivals if line.endswith("sample-calibration: done"))
    assert end - first > 1.0  # printed while the run went on, not all at its end

    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"logs-{tmp_path.name}"])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    messages = [log.message for log in logs]
    assert "svd-init started" in messages and "evaluate[mla] miss" in messages
    assert any(re.fullmatch(r"converted 2 layers in [\d.]+s", m) for m in messages)  # mha2mla_core.conversion.convert, in svd-init


def test_terminal_progress_counts_training_steps_and_shows_the_latest_line():
    import io
    import logging

    from rich.console import Console

    from flows.console import StageProgress, stage_progress

    out = io.StringIO()
    handler = StageProgress(stage_progress(Console(file=out, force_terminal=True, width=160)))
    stage = logging.getLogger("mha2mla.progress")
    core = logging.getLogger("mha2mla_core.training.loop")

    def record(logger, msg, *args, **extra):
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, args, None, extra=extra)

    with handler.progress:
        handler.emit(record(stage, "finetune started", stage="finetune", event="start"))
        handler.emit(record(core, "step %d/%d loss %.4f", 40, 100, 2.5, completed=40, total=100))
        [task] = handler.progress.tasks
        assert (task.completed, task.total, task.fields["count"]) == (40, 100, "40/100")
        assert task.fields["outcome"].endswith("step 40/100 loss 2.5000")
        handler.progress.refresh()
        handler.emit(record(stage, "finetune miss", stage="finetune", event="miss"))
    assert task.finished and "40/100" in out.getvalue() and "done" in out.getvalue()


def test_piped_progress_prints_info_lines_and_leaves_warnings_to_the_log_handler(monkeypatch):
    import io
    import logging

    from rich.console import Console

    from flows import console as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=200))  # not a terminal
    handler = cli.StageProgress(cli.stage_progress(cli.console), shown_from=logging.WARNING)
    core = logging.getLogger("mha2mla_core.conversion.calibration")
    for level, message in ((logging.INFO, "loaded 1 documents"), (logging.WARNING, "fewer tokens than asked")):
        handler.emit(core.makeRecord(core.name, level, __file__, 0, message, (), None))
    handler.emit(core.makeRecord("mha2mla.progress", logging.INFO, __file__, 0, "x", (), None,
                                 extra={"stage": "evaluate[mla]", "event": "hit"}))  # fmt: skip
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == ["  loaded 1 documents", "evaluate[mla]: cached"]
