"""Prefect's start-up in the CLI: its environment, and its ephemeral API server, started before anything heavy is
imported.

    prefect_environment(settings.prefect_home, loggers)   # PREFECT_HOME, logging to the UI, ...
    api = boot_prefect_api()           # a uvicorn subprocess serving prefect.server.api.server:create_app
    ...                                # import torch, transformers, the flows (the server boots meanwhile)
    wait_until_ready(api)              # then run the flow against api.url

It is the server Prefect itself starts when a flow needs an API and none is configured (its
`SubprocessASGIServer`: Prefect's app, same `PREFECT_UI_ENABLED=0` / `PREFECT__SERVER_EPHEMERAL=1` settings),
but started here it boots (seconds: it imports the whole Prefect server) on the other core while the CLI
imports, and the CLI process itself never imports Prefect's server modules. It is stopped at exit.

- Two CLIs on one PREFECT_HOME each start a server on the one sqlite database: `create_app` makes each server's
  start-up (creating and migrating the database, registering block types) wait for the other's (`flock`).
- The server lives in a session of its own, so Ctrl-C in the terminal reaches only the CLI, which stops it; on
  Linux it is also sent SIGTERM when the CLI dies, even by SIGKILL.
- A server that exits during start-up is reported with the last lines of its own log; only an exit while its
  port is really taken by someone else is retried, on another port, at most `_RESPAWNS` times.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_START_FAILED = 3  # uvicorn's exit status when it cannot bind its port, or when the app's start-up fails
_RESPAWNS = 3  # new ports tried when the one chosen was taken meanwhile
_POLL_S = 0.1
_LOG_TAIL = 1500  # characters of the server's log quoted when it fails to start
START_LOCK = ".server-start.lock"  # under PREFECT_HOME
_PR_SET_PDEATHSIG = 1


def prefect_environment(prefect_home: Path, run_loggers: tuple[str, ...]) -> None:
    """Prefect's settings for the CLI, set before Prefect is imported (a variable the user set wins): the embedded
    home, INFO of `run_loggers` to the Prefect UI, no analytics, time for a first start to migrate its database."""
    prefect_home = Path(prefect_home).resolve()
    prefect_home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # to the Prefect UI; the terminal shows WARNING (-v: INFO)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(run_loggers))  # our run logs reach the UI too
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # outside a run they stay local
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # first start migrates its db


def boot_prefect_api() -> EphemeralAPI | None:
    """Start Prefect's ephemeral API server (a subprocess that takes seconds to boot) while the command goes on
    to import torch, transformers and the flows, and point this process's Prefect at it; `wait_until_ready`
    waits for it.

    Only on the embedded default (no PREFECT_API_URL in the environment or the Prefect profile).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        return None
    api = EphemeralAPI.start({**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)})
    use_api(api.url)
    return api


def wait_until_ready(api: EphemeralAPI) -> None:
    """Wait for the server `boot_prefect_api` started, and point this process at it (a port taken meanwhile gives
    a new one)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    api.wait_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    use_api(api.url)


def use_api(url: str) -> None:
    """Point this process's Prefect client (and the subprocesses it starts) at `url`."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


class EphemeralAPI:
    """One uvicorn process on a free local port; `url` is its API root (PREFECT_API_URL)."""

    def __init__(self, env: Mapping[str, str]):
        self.env = {**env, **_SERVER_ENV}
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.respawns = 0
        self.log = tempfile.TemporaryFile()  # the server's stdout and stderr: quoted if it fails to start

    @classmethod
    def start(cls, env: Mapping[str, str]) -> EphemeralAPI:
        api = cls(env)
        api._spawn()
        atexit.register(api.stop)
        return api

    def _spawn(self) -> None:
        self.port = _free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", f"{__name__}:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        self.process = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/api"

    def wait_ready(self, timeout: float) -> None:
        """Return once `/api/health` answers 200; respawn on a port taken meanwhile; raise on exit or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == _START_FAILED and _port_taken(self.port) and self.respawns < _RESPAWNS:
                self.respawns += 1
                self._spawn()
            elif status is not None:
                raise RuntimeError(f"Prefect's ephemeral API server exited with status {status} before it was up "
                                   f"(PREFECT_HOME={self.env.get('PREFECT_HOME', '~/.prefect')}); its log ends: "
                                   f"{self.log_tail()!r}; fix that, or set PREFECT_API_URL to a running server")  # fmt: skip
            elif _healthy(self.url):
                return
            time.sleep(_POLL_S)
        raise RuntimeError(f"Prefect's ephemeral API server at {self.url} was not up after {timeout:.0f} s; "
                           "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")  # fmt: skip

    def log_tail(self) -> str:
        self.log.seek(0, 2)
        self.log.seek(max(0, self.log.tell() - _LOG_TAIL))
        return self.log.read().decode(errors="replace").strip()

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


def create_app() -> Any:
    """Prefect's API app, whose start-up (creating and migrating the database, registering block types) holds
    `PREFECT_HOME/.server-start.lock`, so that servers on one home start one at a time."""
    import anyio.to_thread
    from prefect.server.api.server import create_app as prefect_app
    from prefect.settings import PREFECT_HOME

    app = prefect_app()
    startup = app.router.lifespan_context
    lock_path = Path(PREFECT_HOME.value()) / START_LOCK

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        context = startup(app_)
        with open(lock_path, "a") as lock:
            await anyio.to_thread.run_sync(fcntl.flock, lock, fcntl.LOCK_EX)
            state = await context.__aenter__()  # the lock is released as the file closes
        try:
            yield state
        except BaseException:
            if not await context.__aexit__(*sys.exc_info()):
                raise
        else:
            await context.__aexit__(None, None, None)

    app.router.lifespan_context = lifespan
    return app


def exit_on_signals(*cleanups: Callable[[], Any]) -> Callable[[], None]:
    """On SIGINT (Ctrl-C) or SIGTERM: run `cleanups` (stop the server, drop scratch folders), say how to resume,
    and end the process at once with status 128 + the signal. Returns what puts the previous handlers back.

    Raising in the main thread would not stop a stage that runs in a worker thread, and the exit would then wait
    for it; finished stages are cached, so the same command picks up where this one stopped."""

    def stop(signum: int, frame: Any) -> None:
        for cleanup in cleanups:
            try:
                cleanup()
            except Exception as exc:  # a cleanup that fails must not keep the process alive
                print(f"cleanup failed: {exc}", file=sys.stderr)
        print(f"\ninterrupted ({signal.Signals(signum).name}): finished stages are cached; run the same command "
              "again to resume", file=sys.stderr, flush=True)  # fmt: skip
        sys.stdout.flush()
        os._exit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


def _die_with_parent() -> None:
    """In the server process before it runs (Linux): SIGTERM when the CLI process dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


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
