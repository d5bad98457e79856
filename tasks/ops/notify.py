"""Notifications from the pipeline flow's state hooks (`on_failure`, `on_completion`): a JSON
webhook for programs, Apprise URLs (Slack, Teams, Discord, email, ...) for people.

The hook reads the `notifications:` section from the run's own `config` parameter, so the
same flow notifies wherever it runs (CLI, deployment, worker) without a server-side setup.
A failed POST is logged and never changes the run's state.

The JSON body:

    {"event": "failure" | "completion" | "gate", "pipeline", "flow_run_id", "flow_run_name",
     "state", "message", "url",
     "failure": {"stage", "reason", "fix"},                       # failures
     "stages": {NAME: {"key", "cached", "path"}},                  # finished runs
     "gates": [{"stage", "passed", "details"}]}                   # gate verdicts
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tunepipe.schemas.operations import NotificationsConfig, check_apprise_url, check_webhook_url
from tunepipe.tasks.core.secrets import SecretMissing, redact, redact_url, resolve

log = logging.getLogger("tunepipe.notify")

MAX_RESPONSE_BYTES = 64 * 1024  # the receiver's answer is read but never trusted or kept
_EXC_PREFIX = re.compile(r"^(Flow|Task) run encountered an exception[.:]?\s*")

# What to do about a failed stage, beyond what its own message says.
FIXES = {
    "data": "Fix or remove the rejected source records (rejected.jsonl lists each with its reason and file:line), "
    "or relax data.validation / data.max_rejected_fraction; then rerun: every cached stage is reused.",
}
GENERIC_FIX = "Fix the cause named in the reason and rerun (tunepipe run, or the deployment): stages before it come from the cache."


def post_json(url: str, payload: dict[str, Any], *, timeout: float, headers: dict[str, str] | None = None) -> int:
    """POST one JSON body; returns the HTTP status. Bounded: one timeout, a capped response read."""
    body = json.dumps(payload, default=str).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "tunepipe", **(headers or {})}
    )
    # No proxies: a webhook goes straight to its host (and a loopback receiver stays on loopback).
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        response.read(MAX_RESPONSE_BYTES)
        return response.status


def send(settings: NotificationsConfig, payload: dict[str, Any]) -> bool:
    """The JSON webhook and the Apprise URLs; True when every configured target took it."""
    sent = True
    if settings.webhook_url is not None:
        sent = send_webhook(settings, payload)
    if settings.urls:
        sent = send_apprise(settings, payload) and sent
    return sent


def message(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, markdown body) of a notification, for people."""
    event, pipeline = payload.get("event"), payload.get("pipeline") or "pipeline"
    title = {
        "failure": f"tunepipe {pipeline}: run failed",
        "completion": f"tunepipe {pipeline}: run {str(payload.get('state') or 'finished').lower()}",
        "gate": f"tunepipe {pipeline}: gate {'passed' if payload.get('passed') else 'failed'}",
    }.get(str(event), f"tunepipe {pipeline}: {event}")
    lines = [f"Run `{payload.get('flow_run_name')}`" + (f" ({payload['url']})" if payload.get("url") else "")]
    if failure := payload.get("failure"):
        lines += [f"**Stage:** {failure['stage']}", f"**Reason:** {failure['reason']}", f"**Fix:** {failure['fix']}"]
    for name, stage in (payload.get("stages") or {}).items():
        lines.append(f"- {name}: `{stage.get('key')}`" + (" (cached)" if stage.get("cached") else ""))
    for gate in payload.get("gates") or []:
        lines.append(f"- gate of {gate['stage']}: {'passed' if gate['passed'] else 'FAILED'}")
    return title, "\n".join(lines)


def send_apprise(settings: NotificationsConfig, payload: dict[str, Any]) -> bool:
    """Each Apprise URL, its `${NAME}` references resolved in memory only; logged redacted, never raises."""
    import apprise


    title, body = message(payload)
    kind = apprise.NotifyType.FAILURE if payload.get("event") == "failure" or payload.get("passed") is False else apprise.NotifyType.SUCCESS
    ok = True
    for index, url in enumerate(settings.urls):
        shown = redact_url(url)
        try:
            resolved = resolve(url, f"notifications.urls[{index}]")
            check_apprise_url(resolved, settings.allow_remote, literal=False)
            shown = redact_url(resolved)
            target = apprise.Apprise()
            if not target.add(resolved):
                raise ValueError(f"apprise does not understand the URL {shown}")
            delivered = target.notify(title=title, body=body, notify_type=kind, body_format=apprise.NotifyFormat.MARKDOWN)
        except SecretMissing as exc:
            log.warning("notification not sent: %s", exc)
            ok = False
            continue
        except (ValueError, OSError) as exc:
            log.warning("notification to %s failed: %s", shown, redact(str(exc)))
            ok = False
            continue
        if delivered:
            log.info("notification %s sent to %s (apprise)", payload.get("event"), shown)
        else:
            log.warning("notification %s to %s failed (apprise)", payload.get("event"), shown)
        ok = ok and bool(delivered)
    return ok


def send_webhook(settings: NotificationsConfig, payload: dict[str, Any]) -> bool:
    """Resolve the webhook's `${NAME}` references (in memory only), post, log the outcome with the
    URL redacted, never raise."""
    shown = redact_url(settings.webhook_url)
    try:
        url = resolve(settings.webhook_url, "notifications.webhook_url")
        headers = {name: resolve(value, f"notifications.headers.{name}") for name, value in settings.headers.items()}
        check_webhook_url(url, settings.allow_remote, literal=False)
        shown = redact_url(url)
        status = post_json(url, payload, timeout=settings.timeout_s, headers=headers)
    except SecretMissing as exc:
        log.warning("notification not sent: %s", exc)
        return False
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.warning("notification to %s failed: %s", shown, redact(str(exc)))
        return False
    log.info("notification %s sent to %s (HTTP %s)", payload.get("event"), shown, status)
    return True


# -- building the payload ---------------------------------------------------------------------


def settings_from_parameters(parameters: dict[str, Any] | None) -> tuple[str | None, NotificationsConfig | None]:
    """(pipeline name, notifications) from a pipeline flow run's parameters (JSON or models)."""
    config = (parameters or {}).get("config")
    if config is None:
        return None, None
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    section = config.get("notifications")
    return config.get("name"), (NotificationsConfig.model_validate(section) if section else None)


def failure_details(message: str | None, failed_stage: str | None = None) -> dict[str, str]:
    """Stage, reason and fix from a failed state's message (and the failed task's stage, if known)."""
    reason = _EXC_PREFIX.sub("", (message or "").strip())
    for prefix in ("StageFailed: ", "tunepipe.tasks.core.stage.StageFailed: "):  # bare, or with its module (a traceback's last line)
        if reason.startswith(prefix):
            reason = reason[len(prefix) :]
    stage = failed_stage
    if stage is None:
        match = re.match(r"^([a-z_]+): ", reason)
        stage = match.group(1) if match else "unknown"
    return {"stage": stage, "reason": reason, "fix": FIXES.get(stage, GENERIC_FIX)}


def gate_verdicts(summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Verdicts the run's stages reported: the data stage's validation, and any `gate_passed` metric."""
    verdicts = []
    for name, stage in ((summary or {}).get("stages") or {}).items():
        metrics = stage.get("metrics") or {}
        if "gate_passed" in metrics:
            # evaluate's winner says what ships when its candidate was held back (the SFT adapters, or nothing)
            details = {k: v for k, v in metrics.items() if k.startswith("gate") or k in ("winner", "winner_reason")}
            verdicts.append({"stage": name, "passed": bool(metrics["gate_passed"]), "details": details})
        elif name == "data":
            report_path = Path(stage.get("path", "")) / "report.json"
            details: dict[str, Any] = {"read": metrics.get("read"), "kept": metrics.get("kept"), "rejected": metrics.get("rejected")}
            try:
                report = json.loads(report_path.read_text())
                details["nonblocking_failures"] = [
                    {"expectation": f["name"], "rows": f["count"]} for f in report["validation"]["failures"] if not f["blocking"]
                ]
                details["rejected_rows"] = str(report_path.parent / "rejected.jsonl")
            except (OSError, KeyError, ValueError):
                pass
            verdicts.append({"stage": name, "passed": True, "details": details})
    return verdicts


def _base_payload(event: str, pipeline: str | None, flow_run: Any, state: Any) -> dict[str, Any]:
    from prefect.settings import PREFECT_UI_URL

    ui = PREFECT_UI_URL.value()
    return {
        "event": event,
        "pipeline": pipeline,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "state": state.name,
        "message": state.message,
        "url": f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui else None,
    }


def _failed_stage(flow_run_id: Any) -> str | None:
    """The stage whose task run failed in this flow run, asked of the Prefect API."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            TaskRunFilter,
            TaskRunFilterState,
            TaskRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.FAILED]))),
            )
    except Exception as exc:  # noqa: BLE001 - the message is enough without it
        log.debug("could not read failed task runs: %s", exc)
        return None
    for run in runs:
        if run.name != "run-summary":
            return run.name.rsplit("-", 1)[0]
    return None


def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_failure` hook of the pipeline flow."""
    pipeline, settings = settings_from_parameters(flow_run.parameters)
    if settings is None or "failure" not in settings.on:
        return
    payload = _base_payload("failure", pipeline, flow_run, state)
    payload["failure"] = failure_details(state.message, _failed_stage(flow_run.id))
    send(settings, payload)


def on_completion(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_completion` hook of the pipeline flow: the summary, and gate verdicts."""
    pipeline, settings = settings_from_parameters(flow_run.parameters)
    if settings is None or not ({"completion", "gate"} & set(settings.on)):
        return
    try:
        summary = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a notification without the summary beats none
        summary = None
    summary = summary if isinstance(summary, dict) else None
    stages = {
        name: {"key": s.get("key"), "cached": s.get("cached"), "path": s.get("path")}
        for name, s in ((summary or {}).get("stages") or {}).items()
    }
    gates = gate_verdicts(summary)
    if "completion" in settings.on:
        payload = _base_payload("completion", pipeline, flow_run, state)
        send(settings, {**payload, "stages": stages, "gates": gates})
    if "gate" in settings.on and gates:
        payload = _base_payload("gate", pipeline, flow_run, state)
        send(settings, {**payload, "stages": stages, "gates": gates, "passed": all(g["passed"] for g in gates)})
