"""Run an ASGI app under uvicorn in a background thread, and wait for HTTP health checks.

The thread form is what the tests (and any in-process caller) use: a real server on a real
socket, stopped cleanly. `tunepipe serve` runs uvicorn in the foreground instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tunepipe.tasks.core.net import free_port


class HealthTimeout(RuntimeError):
    """A server did not become healthy in time, or exited while we waited."""


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """`sig` to the child's own process group (it was started with start_new_session): its workers too."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(process: subprocess.Popen | None, timeout_s: float) -> int | None:
    """SIGTERM the child's group, SIGKILL it after `timeout_s`; its exit code (None: never started)."""
    if process is None:
        return None
    if process.poll() is None:
        signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait(10)
    return process.returncode


class ChildServer:
    """A server run as our child in its own process group (its workers die with it), its output appended to
    `log_file`. Subclasses set `log_file` and `stop_timeout_s` and start through `spawn`."""

    log_file: Path
    stop_timeout_s: float
    process: subprocess.Popen | None = None
    log_start = 0  # where this start's lines begin in the (appended) log file

    def spawn(self, command: list[str], env: dict[str, str]) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait() if self.process is not None else 0

    def stop(self) -> int | None:
        return stop_group(self.process, self.stop_timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        """This start's last `lines` log lines, for an error message."""
        if not self.log_file.exists():
            return ""
        with self.log_file.open("rb") as fh:
            fh.seek(self.log_start)
            tail = fh.read().decode(errors="replace").splitlines()[-lines:]
        return f" (log {self.log_file}):\n" + "\n".join(tail) if tail else f" (log {self.log_file} is empty)"

    def start(self) -> "ChildServer":
        raise NotImplementedError

    def __enter__(self) -> "ChildServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_healthy(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    """True when GET `url` answers 200 (no proxy: the servers are local or on the cluster network)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, timeout: float, *, alive: Callable[[], bool] = lambda: True, interval: float = 0.2,
                 describe: Callable[[], str] = lambda: "", headers: dict[str, str] | None = None) -> None:
    """Poll `url` until it answers 200; `HealthTimeout` when `timeout` passes or `alive()` turns False."""
    deadline = time.monotonic() + timeout
    while True:
        if is_healthy(url, headers=headers):
            return
        if not alive():
            raise HealthTimeout(f"the server exited before {url} answered{describe()}")
        if time.monotonic() > deadline:
            raise HealthTimeout(f"{url} did not answer within {timeout:.0f}s{describe()}")
        time.sleep(interval)


class ServerThread:
    """A uvicorn server for `app` on host:port in a daemon thread; `with ServerThread(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        wait_healthy(f"{self.url}/health", timeout, alive=self.thread.is_alive)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
