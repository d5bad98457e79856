"""Process-wide settings for an offline, isolated run. Call before Prefect is imported.

Prefect reads its settings from the environment when it is first imported, so the CLI calls
`configure_runtime` with the workdir first and imports the flows afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from tunepipe.tasks.core.secrets import install_log_redaction

def cache_root() -> Path:
    """tunepipe's machine-wide cache: `$TUNEPIPE_CACHE`, else `~/.cache/tunepipe` (CI keeps it for the run).
    Built environments (vLLM's venv) and converted base models (a GGUF's HF directory) live there: they
    depend on their inputs' bytes only, so every workdir shares them."""
    return Path(os.environ.get("TUNEPIPE_CACHE") or Path.home() / ".cache" / "tunepipe").expanduser()


def log_tail(path: Path, lines: int = 20) -> str:
    """The last lines of a build or server log, for an error message (empty when there is no log)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


QUIET_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The ephemeral server's first start takes ~18 s on 2 cores; Prefect's default wait is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Stage logs from our own and the training libraries' loggers reach the Prefect run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tunepipe,transformers,trl,peft,datasets",
}


def configure_runtime(workdir: str | Path) -> None:
    """Prefect state under the workdir (unless PREFECT_HOME is set), telemetry off."""
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir).resolve() / ".prefect"))
    # Prefect creates its home without parents and then fails to open its database.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    install_log_redaction()  # credential-shaped URL parts and headers never reach a log line


VERBOSE_ENV = "TUNEPIPE_VERBOSE"  # set by `tunepipe run --verbose`; launched workers inherit it

# Without --verbose: what the libraries print on their own, off. Environment variables, so that a
# launched training worker is as quiet. Measured on the quickstart (~3,000 console lines before):
# the Trainer's per-step dicts and bars (tasks/training/progress.py replaces them with one line per
# job), weight-loading and datasets bars, transformers' load reports and advisories, repeated
# FutureWarnings, bitsandbytes' welcome.
QUIET_CONSOLE = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "BITSANDBYTES_NOWELCOME": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning,ignore::UserWarning",
}
# Noisy third-party loggers held at ERROR on the console (their warnings say nothing a user acts on).
# Loggers whose INFO lines are housekeeping (Great Expectations' "Created temporary directory ... for
# ephemeral docs site", twice per data stage); their warnings stay.
INFO_CHATTER = ("great_expectations",)
QUIET_LOGGERS = ("DeepSpeed", "deepspeed", "bitsandbytes", "accelerate", "torch.distributed", "mlflow", "wandb", "alembic",
                 "lm_eval")  # lm_eval: "Passed an already-initialized model through `pretrained`" on every evaluation


def configure_console(verbose: bool) -> None:
    """`--verbose`: everything, as the libraries print it. Otherwise the quiet console above; the
    training jobs then show one progress line each (steps, loss, ETA) and their per-step metrics go
    to the Prefect run log."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for name, value in QUIET_CONSOLE.items():
        os.environ.setdefault(name, value)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in INFO_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)


def route_tunepipe_logs() -> None:
    """Every `tunepipe.*` logger (stage code, the training's `tunepipe.train`) at INFO into the
    Prefect run log and the process's console, in whatever process runs the flow.

    PREFECT_LOGGING_EXTRA_LOGGERS (set by `configure_runtime`) gives a logger Prefect's API
    handler but no level: under the root's WARNING the training's INFO lines (its resume message)
    were dropped, and a flow run that a `prefect worker` started has no such variable at all.
    """
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("tunepipe")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())


class _Subprocess:
    """`subprocess` as Prefect's server module sees it, with Popen starting the server tied to us."""

    def __init__(self, preexec):
        self._module = subprocess
        self._preexec = preexec

    def Popen(self, *args, **kwargs):  # noqa: N802 - the name Prefect calls
        # Its own session: a Ctrl-C or a SIGTERM to our process group does not reach the server,
        # which must outlive the flow run long enough to record how it ended.
        return self._module.Popen(*args, preexec_fn=self._preexec, start_new_session=True, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _die_with_parent(parent: int):
    """preexec_fn: the kernel kills this child when the process that started it dies, SIGKILL included."""
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@contextlib.contextmanager
def owned_prefect_server():
    """The run's temporary Prefect API server as a child that cannot outlive this process.

    Prefect's own ephemeral server is a plain child in our process group: `kill -9` of the run
    left it running (about 230 MB, still using CPU), and a group SIGTERM/Ctrl-C stopped it before
    the flow run could be marked crashed (the client retried for minutes; the run stayed
    Running). Started here, from the main thread (PR_SET_PDEATHSIG follows the thread that
    forked), it dies with us and stays up until the run has recorded its end. With
    PREFECT_API_URL set (a real server) or off Linux, nothing is started.
    """
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield None
        return
    from prefect.server.api import server as server_module
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = server_module.SubprocessASGIServer()
    original = server_module.subprocess
    server_module.subprocess = _Subprocess(_die_with_parent(os.getpid()))
    try:
        server.start()
    finally:
        server_module.subprocess = original
    try:
        os.environ["PREFECT_API_URL"] = server.api_url  # child processes (training launchers) talk to it too
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        _flush_run_logs()  # the log worker sends in the background: drain it while the server is up
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _flush_run_logs() -> None:
    """Send the run logs Prefect still holds. Stopping the server first printed `--- Error logging
    to API --- All connection attempts failed` at the end of every run, and lost those lines."""
    try:
        from prefect.logging.handlers import APILogHandler

        APILogHandler().flush()
    except Exception:  # noqa: BLE001 - a failed flush must not turn a finished run into a failure
        pass
