"""Webhook notifications: payloads, bounded POSTs to a loopback receiver, config checks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from tunepipe.schemas.operations import NotificationsConfig
from tunepipe.tasks.ops import notify


class Receiver:
    """A JSON webhook receiver on 127.0.0.1 that keeps what it is sent (bodies capped at 1 MiB)."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = min(int(self.headers.get("Content-Length", 0)), 1 << 20)
                received.append({"body": json.loads(self.rfile.read(length)), "headers": dict(self.headers)})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self, kind: str) -> list[dict]:
        return [r["body"] for r in self.received if r["body"]["event"] == kind]


def test_post_reaches_a_loopback_receiver_with_headers(monkeypatch):
    monkeypatch.setenv("TUNEPIPE_TEST_HOOK_TOKEN", "tok-123456")
    with Receiver() as receiver:
        settings = NotificationsConfig(
            webhook_url=receiver.url + "?token=${TUNEPIPE_TEST_HOOK_TOKEN}", allow_remote=False,
            headers={"X-Token": "${TUNEPIPE_TEST_HOOK_TOKEN}", "Authorization": "Bearer ${TUNEPIPE_TEST_HOOK_TOKEN}", "X-Source": "ci"},
        )
        assert "tok-123456" not in settings.model_dump_json()  # what Prefect stores as the run's parameters
        assert notify.send(settings, {"event": "failure", "n": 1}) is True
    assert receiver.received[0]["body"] == {"event": "failure", "n": 1}
    headers = receiver.received[0]["headers"]
    assert (headers["X-Token"], headers["Authorization"], headers["X-Source"]) == ("tok-123456", "Bearer tok-123456", "ci")


def test_literal_credentials_are_refused_in_the_config():
    for bad in ({"headers": {"Authorization": "Bearer abc123"}}, {"webhook_url": "http://127.0.0.1:9/x?token=abc123"},
                {"webhook_url": "http://user:pw123@127.0.0.1:9/x"}, {"headers": {"X-Api-Key": "abc123"}}):
        with pytest.raises(ValidationError, match=r"literal credential; give it by environment variable instead: `\$\{NAME\}`"):
            NotificationsConfig(**{"webhook_url": "http://127.0.0.1:9/x", **bad})
    NotificationsConfig(webhook_url="${SLACK_WEBHOOK_URL}")  # the whole URL by reference: checked when resolved


def test_failed_post_and_missing_variable_are_logged_redacted(monkeypatch, caplog):
    from tunepipe.tasks.core.net import free_port

    monkeypatch.setenv("TUNEPIPE_TEST_HOOK_TOKEN", "tok-abcdef")
    port = free_port()
    with caplog.at_level("INFO", logger="tunepipe.notify"):
        settings = NotificationsConfig(webhook_url=f"http://127.0.0.1:{port}/x?token=${{TUNEPIPE_TEST_HOOK_TOKEN}}", timeout_s=1)
        assert notify.send(settings, {"event": "failure"}) is False
        missing = NotificationsConfig(webhook_url="http://127.0.0.1:9/x", headers={"Authorization": "Bearer ${TUNEPIPE_NOT_SET_ANYWHERE}"})
        assert notify.send(missing, {"event": "failure"}) is False
    assert f"notification to http://127.0.0.1:{port}/x?… failed" in caplog.text
    assert "notifications.headers.Authorization: the environment variable TUNEPIPE_NOT_SET_ANYWHERE is not set" in caplog.text
    assert "tok-abcdef" not in caplog.text


def test_log_lines_are_redacted_whatever_logs_them(caplog):
    import logging

    from tunepipe.tasks.core.secrets import remember

    remember("planted-s3cret-value")
    with caplog.at_level("INFO"):
        logging.getLogger("some.library").info("GET https://h.example/x?api_key=zzz999&page=2 with planted-s3cret-value")
        logging.getLogger("other").warning("headers %s", {"Authorization": "Bearer qwerty-123"})
    assert "zzz999" not in caplog.text and "planted-s3cret-value" not in caplog.text and "qwerty-123" not in caplog.text
    assert "?api_key=***&page=2" in caplog.text and "{'Authorization': '***'}" in caplog.text


def test_unreachable_webhook_is_logged_not_raised():
    from tunepipe.tasks.core.net import free_port

    settings = NotificationsConfig(webhook_url=f"http://127.0.0.1:{free_port()}/x", timeout_s=1)
    assert notify.send(settings, {"event": "failure"}) is False


def test_config_refuses_bad_urls_and_non_loopback_when_told():
    with pytest.raises(ValidationError, match="http"):
        NotificationsConfig(webhook_url="ftp://example.org/x")
    with pytest.raises(ValidationError, match="loopback"):
        NotificationsConfig(webhook_url="http://10.0.0.1/x", allow_remote=False)
    NotificationsConfig(webhook_url="http://[::1]:8080/x", allow_remote=False)


def test_failure_details_name_stage_reason_and_fix():
    message = (
        "Flow run encountered an exception: StageFailed: data: expectation 'no-ai' failed for 3 row(s). "
        "Report: /w/report.json; rejected rows: /w/rejected.jsonl"
    )
    details = notify.failure_details(message)
    assert details["stage"] == "data"
    assert details["reason"].startswith("data: expectation 'no-ai' failed for 3 row(s)")
    assert "rejected.jsonl" in details["reason"] and "rejected" in details["fix"]
    assert notify.failure_details("Flow run encountered an exception: OSError: disk full", "sft")["stage"] == "sft"
    # the exception named with its module, as a traceback's last line names it
    qualified = notify.failure_details("tunepipe.tasks.core.stage.StageFailed: sft: out of memory")
    assert (qualified["stage"], qualified["reason"]) == ("sft", "sft: out of memory")


def test_hooks_read_settings_from_the_run_parameters_and_post(monkeypatch):
    monkeypatch.setattr(notify, "_failed_stage", lambda flow_run_id: None)  # no Prefect API in a unit test
    with Receiver() as receiver:
        params = {"config": {"name": "demo", "notifications": {"webhook_url": receiver.url, "on": ["failure", "completion"]}}}
        run = SimpleNamespace(id="00000000-0000-0000-0000-000000000000", name="demo", parameters=params)
        failed = SimpleNamespace(name="Failed", message="Flow run encountered an exception: StageFailed: data: too few rows")
        notify.on_failure(None, run, failed)
        done = SimpleNamespace(
            name="Completed",
            message=None,
            result=lambda raise_on_failure=False: {
                "stages": {"data": {"key": "k", "cached": True, "path": "/nowhere", "metrics": {"read": 3, "kept": 3, "rejected": 0}},
                           "evaluate": {"key": "e", "cached": False, "path": "/e", "metrics": {"gate_passed": False, "gate_reason": "worse",
                                                                                          "winner": "sft", "winner_reason": "align held back", "tasks": {}}}}
            },
        )
        notify.on_completion(None, run, done)
    failure = receiver.events("failure")[0]
    assert failure["pipeline"] == "demo" and failure["failure"]["stage"] == "data"
    completion = receiver.events("completion")[0]
    assert completion["stages"]["data"]["cached"] is True
    assert {g["stage"]: g["passed"] for g in completion["gates"]} == {"data": True, "evaluate": False}
    # what ships when the candidate was held back travels with the verdict; other metrics do not
    evaluate = next(g for g in completion["gates"] if g["stage"] == "evaluate")
    assert evaluate["details"] == {"gate_passed": False, "gate_reason": "worse", "winner": "sft", "winner_reason": "align held back"}
    assert receiver.events("gate") == []  # not asked for


def test_no_section_no_post():
    run = SimpleNamespace(id="x", name="n", parameters={"config": {"name": "demo"}})
    notify.on_failure(None, run, SimpleNamespace(name="Failed", message="boom"))  # nothing to post to, no error


def test_apprise_urls_reach_a_receiver_with_the_failure_stage_and_fix(monkeypatch):
    monkeypatch.setenv("TUNEPIPE_TEST_APPRISE_TOKEN", "tok-987654")
    with Receiver() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        settings = NotificationsConfig(urls=[f"json://127.0.0.1:{port}/hook?token=${{TUNEPIPE_TEST_APPRISE_TOKEN}}"], allow_remote=False)
        assert "tok-987654" not in settings.model_dump_json()
        payload = {"event": "failure", "pipeline": "p", "flow_run_name": "p-1", "state": "Failed",
                   "failure": {"stage": "data", "reason": "3 rows rejected", "fix": "fix the rows"}}
        assert notify.send(settings, payload) is True
    body = receiver.received[0]["body"]  # Apprise's own JSON: version, title, message, type
    assert body["title"] == "tunepipe p: run failed" and body["type"] == "failure"
    assert "**Stage:** data" in body["message"] and "**Fix:** fix the rows" in body["message"]
    assert "tok-987654" not in str(receiver.received[0]["headers"])  # the token travelled in the query only


def test_apprise_service_urls_must_refer_to_their_credentials():
    with pytest.raises(ValidationError, match=r"holds its service's credentials literally"):
        NotificationsConfig(urls=["slack://T000/B000/XXXXXXXX"])
    with pytest.raises(ValidationError, match=r"is remote \(allow_remote is false\)"):
        NotificationsConfig(urls=["slack://${SLACK_TOKENS}"], allow_remote=False)
    with pytest.raises(ValidationError, match=r"set webhook_url .* or urls"):
        NotificationsConfig()
    assert NotificationsConfig(urls=["slack://${SLACK_TOKENS}", "${TEAMS_URL}"]).urls[1] == "${TEAMS_URL}"
