"""A local Prefect server and process workers as child processes (`tunepipe up`, the tests).

The server keeps its database under `PREFECT_HOME` (the workdir's `.prefect` by default), runs
its event services (triggers, automations, scheduler) and serves the UI. Workers poll a work
pool and run each flow run in a subprocess of their own, in the worker's environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200


class ServerError(RuntimeError):
    """The Prefect server could not be reached or started."""


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API at `url` (ending in /api) answers its health check."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_healthy_url(url: str, timeout: float = 2.0) -> bool:
    """True when `url` answers 200."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def require_server(url: str) -> None:
    if not is_healthy(url):
        raise ServerError(f"no Prefect server answers at {url}: start one with `tunepipe up` (or set PREFECT_API_URL)")


def server_env(prefect_home: str | Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        **extra,
    }
    env.pop("PREFECT_API_URL", None)  # the server serves the API; it is no client of another one
    return env


def worker_env(url: str, prefect_home: str | Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        **extra,
    }


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


@dataclass
class LocalStack:
    """A Prefect server plus process workers, started and stopped together."""

    prefect_home: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    log_dir: Path | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    server: subprocess.Popen | None = field(default=None, init=False)
    workers: dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    @property
    def url(self) -> str:
        return api_url(self.host, self.port)

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ui_env(self) -> dict[str, str]:
        """Where the UI's browser code calls the API (its `/ui-settings`): this server's host and port.
        Unset, the UI called Prefect's default http://127.0.0.1:4200/api whatever `--port` said."""
        return {"PREFECT_UI_API_URL": self.url, "PREFECT_UI_URL": self.ui_url}

    def _log(self, name: str):
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{name}.log", "ab")

    def start_server(self, timeout: float = 120.0) -> None:
        if is_healthy(self.url):
            raise ServerError(f"something already answers at {self.url}: stop it or choose another --port")
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        cmd = [*_prefect_cli(), "server", "start", "--host", self.host, "--port", str(self.port)]
        self.server = subprocess.Popen(
            cmd, env=server_env(self.prefect_home, **self.ui_env(), **self.env_extra), stdout=self._log("server"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise ServerError(f"prefect server exited with {self.server.returncode} (log: {self.log_dir or 'not kept'})")
            if is_healthy(self.url):
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"prefect server did not answer at {self.url} within {timeout:.0f}s")

    def start_worker(
        self, pool: str, *, queue: str | None = None, query_seconds: float | None = None, prefect_home: Path | None = None
    ) -> None:
        """A process worker for `pool`; `prefect_home`: its own (a worker on another host has one), else the server's."""
        ensure_process_pool(pool, self.url)
        cmd = [*_prefect_cli(), "worker", "start", "--pool", pool, "--type", "process"]
        if queue:
            cmd += ["--work-queue", queue]
        extra = dict(self.env_extra)
        if query_seconds is not None:
            extra["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
        self.workers[pool] = subprocess.Popen(
            cmd, env=worker_env(self.url, prefect_home or self.prefect_home, **extra), stdout=self._log(f"worker-{pool}"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def start_mlflow(self, backend_store_uri: str, port: int, artifacts_dir: Path, timeout: float = 120.0) -> str:
        """An `mlflow server` beside Prefect on the tracking store the pipeline writes to (`tracking.mlflow`);
        stopped with the rest. Returns its URL."""
        url = f"http://{self.host}:{port}"
        if is_healthy_url(f"{url}/health"):
            raise ServerError(f"something already answers at {url}: stop it or set tracking.mlflow.server_port")
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri, "--host", self.host,
               "--port", str(port), "--artifacts-destination", artifacts_dir.resolve().as_uri()]
        self.workers["mlflow"] = proc = subprocess.Popen(
            cmd, env={**os.environ, **self.env_extra}, stdout=self._log("mlflow"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"mlflow server exited with {proc.returncode} (log: {self.log_dir or 'not kept'})")
            if is_healthy_url(f"{url}/health"):
                return url
            time.sleep(0.5)
        raise ServerError(f"mlflow server did not answer at {url} within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        """Workers first (each cancels its runs' processes), then the server."""
        for proc in [*self.workers.values(), self.server]:
            if proc is not None and proc.poll() is None:
                _signal_group(proc, signal.SIGINT)
        for proc in [*self.workers.values(), self.server]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.workers.clear()
        self.server = None

    def alive(self) -> bool:
        return all(p.poll() is None for p in [self.server, *self.workers.values()] if p is not None)

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # our own child's process group (start_new_session), nothing else
    except (ProcessLookupError, PermissionError):
        pass


def ensure_process_pool(name: str, url: str) -> bool:
    """Create a process work pool named `name` unless one exists; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template())
            )
        except ObjectAlreadyExists:
            return False
        return True
