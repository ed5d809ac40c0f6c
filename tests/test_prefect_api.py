"""The CLI's process plumbing: the early ephemeral Prefect API and the exit that skips interpreter teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from infra.prefect_api import EphemeralAPI

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ephemeral_api_serves_health_then_stops(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    api = EphemeralAPI.start(env)
    try:
        api.wait_ready(timeout=120)
        with urllib.request.urlopen(f"{api.url}/health", timeout=5) as response:
            assert response.status == 200
    finally:
        process = api.process
        api.stop()
    assert process.poll() is not None and api.process is None


def test_wait_ready_names_the_exit_status_of_a_dead_server(tmp_path):
    api = EphemeralAPI({**os.environ, "PREFECT_HOME": str(tmp_path)})
    api.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    api.url = "http://127.0.0.1:9/api"
    api.process.wait()
    with pytest.raises(RuntimeError, match="exited with status 7"):
        api.wait_ready(timeout=5)


@pytest.mark.slow
def test_two_servers_on_one_fresh_prefect_home_both_come_up(tmp_path):
    """Two CLIs started at once in one directory: each boots a server on the same new sqlite database."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    apis = [EphemeralAPI.start(env), EphemeralAPI.start(env)]
    try:
        for api in apis:
            api.wait_ready(timeout=240)
            with urllib.request.urlopen(f"{api.url}/health", timeout=5) as response:
                assert response.status == 200
    finally:
        for api in apis:
            api.stop()


@pytest.mark.slow
def test_a_server_that_cannot_start_is_reported_with_its_own_log_and_not_respawned(tmp_path):
    """An unusable PREFECT_HOME (here a file; a full disk fails the same way) is not a port problem."""
    home = tmp_path / "home"
    home.write_text("not a directory")
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    api = EphemeralAPI.start(env)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="exited with status 3 .*PREFECT_HOME=.*home.*its log ends") as err:
            api.wait_ready(timeout=180)
    finally:
        api.stop()
    assert api.respawns == 0 and time.monotonic() - started < 120
    assert "port" not in str(err.value)


PARENT = """
import sys, time
from infra.prefect_api import EphemeralAPI
api = EphemeralAPI.start({"PREFECT_HOME": sys.argv[1], "PATH": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
print(api.process.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_server_does_not_outlive_a_killed_cli(tmp_path, sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    server = int(parent.stdout.readline())
    parent.send_signal(sig)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _running(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(server)


def _running(pid: int) -> bool:
    """True while `pid` runs (a zombie, which has exited but is not reaped by init yet, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_console_app_exit_keeps_status_output_and_atexit_handlers(tmp_path):
    script = textwrap.dedent(
        """
        import atexit, typer
        from flows.cli import ConsoleApp
        app = ConsoleApp()
        @app.command()
        def fail() -> None:
            atexit.register(lambda: print("atexit ran", flush=True))
            print("output", end="")  # unflushed
            raise typer.Exit(3)
        app()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert done.stdout == "outputatexit ran\n"
