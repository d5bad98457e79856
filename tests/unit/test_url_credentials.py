"""Credentials in URLs and headers are refused as literals, redacted in logs, and a base URL's
query string keeps working (issue 29, item 2)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.evaluate import JudgeEndpoint
from tunepipe.schemas.operations import NotificationsConfig
from tunepipe.tasks.core.secrets import redact


@pytest.mark.parametrize("url, problem", [
    ("http://host/v1?api_key=sk-123456", "query parameter api_key holds a literal credential"),
    ("http://host/v1?sig=abcdef&api-version=1", "query parameter sig holds a literal credential"),
    ("http://user:pass@host/v1", "credentials before the host"),
    ("http://${USER}:${PASS}@host/v1", "credentials before the host"),  # Basic auth would replace the Bearer key
])
def test_endpoint_urls_refuse_credentials(url, problem):
    with pytest.raises(ValidationError, match=problem):
        JudgeEndpoint(url=url, model="m")


def test_deploy_server_url_refuses_userinfo_and_token():
    with pytest.raises(ValidationError, match="credentials before the host"):
        DeployConfig(name="a", server_url="http://user:pass@host?token=abc")
    with pytest.raises(ValidationError, match="query parameter token"):
        DeployConfig(name="a", server_url="http://host?token=abcdef")
    assert DeployConfig(name="a", server_url="http://host/?token=${TOKEN}").server_url == "http://host/?token=${TOKEN}"


@pytest.mark.parametrize("url", [
    "https://hooks.slack.com/services/T0000/B0000/XXXXXXXXXXXXXXXX",
    "https://discord.com/api/webhooks/123456/abcdefTOKEN",
    "https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/123/456",
    "https://hooks.example.com/x?token=literal",
    "https://bot:secret@hooks.example.com/x",
])
def test_webhooks_refuse_secrets_in_path_query_and_userinfo(url):
    with pytest.raises(ValidationError, match="literal credential"):
        NotificationsConfig(webhook_url=url)


def test_references_and_harmless_queries_are_accepted():
    assert NotificationsConfig(webhook_url="${SLACK_WEBHOOK_URL}").webhook_url == "${SLACK_WEBHOOK_URL}"
    assert NotificationsConfig(webhook_url="https://hooks.slack.com/services/${SLACK_PATH}").webhook_url
    assert NotificationsConfig(webhook_url="https://bot:${HOOK_PASS}@hooks.example.com/x").webhook_url
    assert JudgeEndpoint(url="https://x.openai.azure.com/openai/v1?api-version=2024-10-21", model="m").url.endswith("2024-10-21")
    assert JudgeEndpoint(url="http://host/v1?api_key=${KEY}", model="m").url == "http://host/v1?api_key=${KEY}"


@pytest.mark.parametrize("name", ["X-Api", "X-API-Id", "X-Signature", "Authorization", "X-Auth-Token"])
def test_literal_credential_headers_are_refused(name):
    with pytest.raises(ValidationError, match=f"headers.{name} holds a literal credential"):
        NotificationsConfig(webhook_url="http://127.0.0.1:9/x", headers={name: "literal-value"})
    assert NotificationsConfig(webhook_url="http://127.0.0.1:9/x", headers={name: "${VALUE}"}).headers[name] == "${VALUE}"


def test_logged_webhook_paths_and_api_headers_are_redacted():
    line = ("POST https://hooks.slack.com/services/T0AAA/B0BBB/sEcReTsEcReT failed; "
            "https://discord.com/api/webhooks/1234/tokentokentoken; headers {'X-Api': 'literal-hdr-value'}")
    cleaned = redact(line)
    for secret in ("T0AAA/B0BBB/sEcReTsEcReT", "1234/tokentokentoken", "literal-hdr-value"):
        assert secret not in cleaned
    assert "hooks.slack.com/services/***" in cleaned


@pytest.fixture
def recorder():
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            body = b'{"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x", "root": "/r"}]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_a_base_url_with_a_query_keeps_its_query_after_the_path(recorder, monkeypatch):
    from tunepipe.tasks.lm.server_client import ServerClient
    from tunepipe.tasks.lm.judge import openai_client

    base, seen = recorder
    monkeypatch.setenv("TUNEPIPE_T_TOKEN", "tok-abcdef")
    deploy = DeployConfig(name="a", server_url=f"{base}/?api-version=2024-10-21&token=${{TUNEPIPE_T_TOKEN}}")
    assert ServerClient(deploy.server_url, None, 5).served() == {"m": "/r"}
    judge = JudgeEndpoint(url=f"{base}/openai/v1?api-version=2024-10-21", model="m")
    assert [m.id for m in openai_client(judge).models.list()] == ["m"]
    assert seen == ["/v1/models?api-version=2024-10-21&token=tok-abcdef", "/openai/v1/models?api-version=2024-10-21"]


def test_a_webhook_url_for_a_log_line_hides_its_path_secret():
    from tunepipe.tasks.core.secrets import redact_url

    assert redact_url("https://hooks.slack.com/services/T0AAA/B0BBB/sEcReT") == "https://hooks.slack.com/…"
    assert redact_url("https://discord.com/api/webhooks/1/tok") == "https://discord.com/…"
    assert redact_url("https://hooks.example.org/tunepipe?x=1") == "https://hooks.example.org/tunepipe?…"
