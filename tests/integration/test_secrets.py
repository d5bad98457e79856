"""No planted secret reaches anything a run writes: a real `tunepipe run --until data` with its
ephemeral Prefect server (flow-run parameters in .prefect/prefect.db), the artifacts, the logs,
and a webhook whose POST fails (the failure is logged with the URL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.prefect

SECRETS = {
    "TUNEPIPE_PLANTED_HOOK_TOKEN": "hooktok-7f3a9c1e5b",
    "TUNEPIPE_PLANTED_AUTH": "authval-2d8e4f6a0c",
    "TUNEPIPE_PLANTED_SERVE_KEY": "servekey-9b1d3f5e7a",
}


class FailingReceiver:
    """Keeps each request's headers and query, then answers 500: the run logs a failed POST."""

    def __init__(self) -> None:
        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                seen.append({"path": self.path, "headers": dict(self.headers)})
                self.send_response(500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def files_holding(root: Path, needles: list[bytes]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits = [n.decode() for n in needles if n in data]
            if hits:
                found[str(path.relative_to(root))] = hits
    return found


def test_no_planted_secret_in_anything_a_run_writes(tmp_path):
    receiver = FailingReceiver()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i} about rivers?", "output": f"Answer {i}: rivers flow."}) + "\n"
                            for i in range(5)))
    config = {
        "name": "secrets",
        "workdir": str(tmp_path / "work"),
        "data": {"sources": [{"path": str(data), "format": "alpaca"}], "split": {"validation": 0.0, "test": 0.0}},
        "notifications": {
            "webhook_url": f"http://127.0.0.1:{receiver.port}/hook?token=${{TUNEPIPE_PLANTED_HOOK_TOKEN}}",
            "headers": {"Authorization": "Bearer ${TUNEPIPE_PLANTED_AUTH}"},
            "on": ["completion", "gate"], "allow_remote": False, "timeout_s": 5,
        },
        "serve": {"api_key": "${TUNEPIPE_PLANTED_SERVE_KEY}"},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}  # its own ephemeral server
    env.update(SECRETS, PYTHONPATH=str(REPO), PREFECT_LOGGING_LEVEL="DEBUG", PREFECT_LOGGING_LOG_PRINTS="true")
    proc = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "run", str(path), "--until", "data"],
                          env=env, capture_output=True, timeout=300, cwd=tmp_path)
    receiver.server.shutdown()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output.decode()[-4000:]

    # The secrets were used: resolved in memory and sent to the webhook.
    assert receiver.seen, "the webhook was never called"
    assert receiver.seen[0]["path"] == f"/hook?token={SECRETS['TUNEPIPE_PLANTED_HOOK_TOKEN']}"
    assert receiver.seen[0]["headers"]["Authorization"] == f"Bearer {SECRETS['TUNEPIPE_PLANTED_AUTH']}"
    # The failed POST was logged, with the URL redacted.
    assert f"notification to http://127.0.0.1:{receiver.port}/hook?… failed".encode() in output

    # The run was recorded (parameters, logs) where we look, by reference only.
    work = tmp_path / "work"
    db = work / ".prefect" / "prefect.db"
    assert db.is_file()
    assert b"${TUNEPIPE_PLANTED_HOOK_TOKEN}" in db.read_bytes() + b"".join(p.read_bytes() for p in (work / ".prefect").glob("*.db-wal"))
    needles = [v.encode() for v in SECRETS.values()]
    assert files_holding(work, needles) == {}
    assert files_holding(tmp_path, needles) == {}
    assert [n for n in needles if n in output] == []
