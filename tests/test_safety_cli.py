"""The command line under bad input and from elsewhere: runs from any directory, fails early and in one line, stops
at once on Ctrl-C (tiny seeded Llama; the session's Prefect test server, or a real CLI process for the signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app

pytest_plugins = ["pipeline_fixtures"]

REPO = Path(__file__).resolve().parents[1]
TINY = ["--rope-dims", "4", "--kv-rank", "4", "--calib-tokens", "512", "--eval-tokens", "256"]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.services
@pytest.mark.slow
def test_convert_runs_from_any_directory_with_relative_paths(local_env, tiny_source, tmp_path, monkeypatch):
    """A relative artifact root and a relative --eval-text mean the caller's directory, in the reload
    subprocess too (it used to run in the repository root and open another store)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "heldout.txt").write_text("the cat sat on the mat and the dog ran in the park . " * 40)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MHA2MLA_ARTIFACT_ROOT", "./store")
    monkeypatch.setenv("COLUMNS", "250")
    from infra.stage import context

    context.cache_clear()
    code, out = invoke("convert", str(tiny_source), *TINY, "--eval-text", "./heldout.txt")
    assert code == 0, out
    assert "mla, reloaded (fresh process)" in out and f"checkpoint: {(elsewhere / 'store').as_uri()}/" in out


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--rope-dims", "1000"], "rope_dims=1000 > head_dim=16 for model_type=llama; use <= 16"),
        (["--kv-rank", "100000"], "kv_rank=100000 > rows it factors per KV head"),
        (["--eval-text", "{empty}"], "empty.txt is empty; give --eval-text a file with text in it"),
        (["--name", "my model/v1"], "name: String should match pattern"),
    ],
)
def test_bad_values_fail_before_any_stage_in_one_line(local_env, tiny_source, executions, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n")
    args = [a.format(empty=tmp_path / "empty.txt") for a in args]
    code, out = invoke("convert", str(tiny_source), *TINY[4:], *args)
    assert code == 2 and message in out.replace("\n", " "), out
    assert not executions and "Traceback" not in out and len(out.strip().splitlines()) <= 3, out


def cli_process(tmp_path: Path, *args: str) -> subprocess.Popen:
    """`mha2mla ARGS` as a user runs it: its own process, its own ephemeral API server, everything in tmp_path."""
    env = {**os.environ, "MHA2MLA_ARTIFACT_ROOT": str(tmp_path / "store"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MHA2MLA_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "MHA2MLA_PREFECT_HOME": str(tmp_path / "prefect"),
           "PYTHONPATH": str(REPO), "COLUMNS": "200"}  # fmt: skip
    for name in ("PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(name, None)
    command = [sys.executable, "-c", "from flows.cli import app; app()", *args]
    return subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_an_error_inside_a_stage_is_one_line(tiny_source, tmp_path):
    """Prefect's engine logs a failing run with its traceback (for a binary calibration file: thousands of lines);
    the user reads one line."""
    binary = tmp_path / "calib.txt"
    binary.write_bytes(os.urandom(200_000))
    cli = cli_process(tmp_path, "convert", str(tiny_source), *TINY, "--calib-data", str(binary))
    out, _ = cli.communicate(timeout=400)
    assert cli.returncode == 2 and "error: 'utf-8' codec can't decode byte" in out, out[-3000:]
    assert "Traceback" not in out and len(out) < 2000 and len(out.strip().splitlines()) <= 8, out[-3000:]


def test_error_messages_mask_uri_passwords():
    from flows.convert import ConvertParams
    from flows.errors import describe_error

    message = describe_error(ConnectionError("cannot reach http://alice:s3cr3t@tracking:5000/api and s3://k:v@b/x"))
    assert message == "cannot reach http://alice:***@tracking:5000/api and s3://k:***@b/x"
    with pytest.raises(ValidationError) as info:
        ConvertParams(model="m", name="postgresql://bob:hunter2@db/x")
    assert "hunter2" not in describe_error(info.value) and "bob:***@db" in describe_error(info.value)


def test_the_cli_gives_an_in_process_caller_its_signal_handlers_back(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no server is started
    monkeypatch.setenv("MHA2MLA_PREFECT_HOME", str(tmp_path / "prefect"))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, out = invoke("convert", str(tmp_path / "model"), "--rope-dims", "3")
    assert code == 2 and "rope_dims" in out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.slow
def test_ctrl_c_stops_the_cli_and_its_api_server_at_once(tiny_source, tmp_path):
    """The CLI with its own ephemeral API server, interrupted while a stage computes: it exits within seconds with
    130, the server is gone, and a scratch folder of the killed run is not left behind."""
    import psutil

    cli = cli_process(tmp_path, "convert", str(tiny_source), *TINY, "--calib-tokens", "200000", "--no-check")
    try:
        deadline = time.monotonic() + 400
        while not (tmp_path / "scratch").is_dir() or not any((tmp_path / "scratch").iterdir()):
            assert cli.poll() is None and time.monotonic() < deadline, cli.stdout.read()
            time.sleep(0.2)
        server = [p for p in psutil.Process(cli.pid).children() if "uvicorn" in " ".join(p.cmdline())]
        assert len(server) == 1
        interrupted = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130 and time.monotonic() - interrupted < 20, out
    assert "interrupted (SIGINT): finished stages are cached" in out
    server[0].wait(timeout=20)
    assert list((tmp_path / "scratch").iterdir()) == []
