"""The CLI's process plumbing: the early ephemeral Prefect API and the exit that skips interpreter teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
