"""A run that dies leaves nothing behind: `kill -9` takes its temporary Prefect server with it;
SIGTERM stops it within seconds, the flow run is recorded as crashed, staging is kept to resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.prefect


def children(pid: int) -> dict[int, str]:
    """Live (non-zombie) child processes of `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_run(tmp_path: Path, records: int) -> subprocess.Popen:
    data = tmp_path / "data.jsonl"
    with open(data, "w") as handle:
        for i in range(records):
            handle.write(json.dumps({"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."}) + "\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"name: death\nworkdir: {tmp_path / 'work'}\ndata:\n  sources: [{{path: {data}}}]\n"
                      "  split: {validation: 0.0, test: 0.0}\n  dedup: {near: false}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL") and k != "PREFECT_HOME"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "tunepipe.flows.cli.main", "run", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "run.err", "wb"), start_new_session=True)


def _waited(condition, timeout: float) -> bool:
    """True once `condition()` holds, False if it still does not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def test_sigkill_leaves_no_prefect_server_behind(tmp_path):
    run = start_run(tmp_path, 5)
    server = {}
    try:
        server = wait_for(lambda: {p: c for p, c in children(run.pid).items() if "uvicorn" in c}, 120, "the temporary server's start")
        run.kill()
        run.wait()
        wait_for(lambda: not any(alive(p) for p in server), 10, "the server's death after its run's")
    finally:
        for pid in server:  # only what this test's run started, and only if the fix failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_within_seconds_marks_the_run_crashed_and_keeps_staging(tmp_path):
    run = start_run(tmp_path, 150_000)
    staging = tmp_path / "work" / "artifacts" / "data" / ".staging"
    server = {}
    try:
        wait_for(lambda: staging.is_dir() and any(staging.iterdir()), 180, "the data stage's start")
        server = {p: c for p, c in children(run.pid).items() if "uvicorn" in c}
        time.sleep(1)  # well inside the stage (it takes far longer than this)
        os.killpg(run.pid, signal.SIGTERM)  # as a terminal's Ctrl-C or a service manager's stop: the whole group
        started = time.monotonic()
        code = run.wait(timeout=60)
        took = time.monotonic() - started
        # The server dies by the kernel's PR_SET_PDEATHSIG when the run exits; on a loaded machine it
        # may not have been scheduled to die yet when run.wait() returns, so give it 10 s as kill -9 gets.
        server_died = not server or _waited(lambda: not any(alive(p) for p in server), 10)
    finally:
        if run.poll() is None:
            run.kill()
        for pid in server:  # cleanup only: whether it died by itself was measured above
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = (tmp_path / "run.err").read_text()
    assert took < 15, f"SIGTERM took {took:.1f}s to stop the run"
    # Prefect re-raises SIGTERM once the run is recorded: the process ends by the signal, as a service manager expects.
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM) and "Traceback" not in err, err[-3000:]
    assert "Crash detected! Execution was aborted by a termination signal" in err
    assert server, "the run's temporary Prefect server was not found among its children"
    assert server_died, f"the temporary server {sorted(server)} outlived its run by 10 s"
    assert any(staging.iterdir()), "staging was removed: nothing to resume from"
    assert not list((tmp_path / "work" / "artifacts" / "data").glob("*/manifest.json")), "a half artifact was published"
    with sqlite3.connect(tmp_path / "work" / ".prefect" / "prefect.db") as db:
        states = db.execute("SELECT state_type FROM flow_run").fetchall()
    assert states and all(state in ("CRASHED", "CANCELLED") for (state,) in states), states
