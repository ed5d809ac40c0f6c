"""Prefect's ephemeral API server, started by the CLI before anything heavy is imported.

    api = EphemeralAPI.start(env)      # a uvicorn subprocess serving prefect.server.api.server:create_app
    ...                                # import torch, transformers, the flows (the server boots meanwhile)
    api.wait_ready(timeout=180)        # then run the flow against api.url

It is the server Prefect itself starts when a flow needs an API and none is configured (its
`SubprocessASGIServer`: same app factory, same `PREFECT_UI_ENABLED=0` / `PREFECT__SERVER_EPHEMERAL=1` settings),
but started here it boots (seconds: it imports the whole Prefect server) on the other core while the CLI
imports, and the CLI process itself never imports Prefect's server modules. It is stopped at exit.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping

_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind its port
_POLL_S = 0.1


class EphemeralAPI:
    """One uvicorn process on a free local port; `url` is its API root (PREFECT_API_URL)."""

    def __init__(self, env: Mapping[str, str]):
        self.env = {**env, **_SERVER_ENV}
        self.process: subprocess.Popen | None = None
        self.url = ""

    @classmethod
    def start(cls, env: Mapping[str, str]) -> EphemeralAPI:
        api = cls(env)
        api._spawn()
        atexit.register(api.stop)
        return api

    def _spawn(self) -> None:
        port = _free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        self.process = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}/api"

    def wait_ready(self, timeout: float) -> None:
        """Return once `/api/health` answers 200; respawn on a port taken meanwhile; raise on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == _PORT_IN_USE:
                self._spawn()
            elif status is not None:
                raise RuntimeError(f"Prefect's ephemeral API server exited with status {status} before it was up; "
                                   "run with --verbose for its log, or set PREFECT_API_URL to a running server")  # fmt: skip
            elif _healthy(self.url):
                return
            time.sleep(_POLL_S)
        raise RuntimeError(f"Prefect's ephemeral API server at {self.url} was not up after {timeout:.0f} s; "
                           "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")  # fmt: skip

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
