"""Operations sections of the pipeline YAML: `schedule`, `watch`, `notifications`, `deployment`.

All optional: a pipeline without them runs with `tunepipe run` exactly as before. They take
effect through `tunepipe deploy` (schedule, watch trigger, work pools), `tunepipe watch`
(the inbox) and the pipeline flow's state hooks (notifications).
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.base import StrictModel, resolve_path
from tunepipe.schemas.data import FileType, SourceFormat
from tunepipe.schemas.secret_refs import REFERENCE, SENSITIVE_HEADER, check_literal, check_url, is_reference, references

# The event the watcher emits for every new data version; deployment triggers match on it.
DATA_VERSION_EVENT = "tunepipe.data.version.created"


class ScheduleConfig(StrictModel):
    """When the deployed pipeline runs on its own: a cron line or a fixed interval (one of them)."""

    cron: str | None = Field(default=None, description="Cron line (5 fields, e.g. `0 3 * * *`: every day at 03:00).")
    interval_s: float | None = Field(default=None, gt=0, description="Run every this many seconds (instead of cron).")
    timezone: str = Field(default="UTC", description="IANA time zone the cron line is read in.")
    active: bool = Field(default=True, description="False registers the schedule paused.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            from prefect._internal.schemas.validators import validate_cron_string

            validate_cron_string(value)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "ScheduleConfig":
        if (self.cron is None) == (self.interval_s is None):
            raise ValueError("set exactly one of cron or interval_s")
        return self


class DropSourceConfig(StrictModel):
    """How the files of a data version are read: a `data.sources` entry without its path."""

    format: SourceFormat = Field(default="auto", description="Record layout of dropped files (as `data.sources[].format`).")
    task: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Task name of dropped records.")
    file_type: FileType = Field(default="auto", description="How to read dropped files; auto picks by extension.")
    field_map: dict[str, str] = Field(default_factory=dict, description="Column renames, source name → canonical name.")
    text_unit: Literal["paragraph", "line", "file"] = Field(default="paragraph", description="For .txt drops: document unit.")


class WatchConfig(StrictModel):
    """Data drops: an inbox whose new files become data versions that trigger a retraining run."""

    inbox: str | None = Field(
        default=None,
        description="Directory (relative to the YAML) or fsspec URL (`s3://bucket/prefix`) watched for new or changed "
        "files; `tunepipe watch INBOX` may name it instead.",
    )
    patterns: list[str] = Field(
        default=["*.jsonl", "*.ndjson", "*.json", "*.csv", "*.parquet", "*.txt"],
        min_length=1,
        description="File name globs taken from the inbox; anything else (temp files, dotfiles) is ignored.",
    )
    debounce_s: float = Field(
        default=5.0, ge=0, description="A file is taken once its size and mtime have not changed for this many seconds."
    )
    poll_s: float = Field(default=2.0, gt=0, description="Seconds between inbox scans.")
    source: DropSourceConfig = Field(
        default_factory=DropSourceConfig, description="How dropped files are read; each data version becomes one data source."
    )

    @field_validator("inbox")
    @classmethod
    def _resolve_inbox(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NotificationsConfig(StrictModel):
    """A JSON webhook posted by the pipeline flow's state hooks. Credentials (a token in the URL,
    an authorization header) are given as `${NAME}`, an environment variable of the process that
    runs the flow: the config is stored as the flow run's parameters, the value never is."""

    webhook_url: str | None = Field(
        default=None,
        description="URL the JSON notification is POSTed to (http or https), for programs. A credential in it is a "
        "`${NAME}` reference (`https://hooks.example.com/x?token=${HOOK_TOKEN}`, or the whole URL: `${SLACK_WEBHOOK_URL}`).",
    )
    urls: list[str] = Field(
        default_factory=list,
        description="Apprise URLs for people (https://github.com/caronc/apprise/wiki): `slack://`, `msteams://`, "
        "`discord://`, `mailto://`, `json://host/path` and 100 more; each gets a readable message of the same events. "
        "Service URLs carry their tokens: give them by reference (`slack://${SLACK_TOKENS}` or `${SLACK_URL}`); only "
        "`json://`, `form://` and `xml://` URLs without credentials may be literal.",
    )
    on: list[Literal["failure", "completion", "gate"]] = Field(
        default=["failure", "gate"],
        description="failure: the run failed (stage, reason, fix); completion: every finished run with its summary; "
        "gate: a finished run whose stages reported a gate verdict (the data stage's validation, an evaluation gate).",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=60, description="Seconds a POST may take; a failed POST is logged, never fatal.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra HTTP headers. Credential headers (Authorization, *token*, *key*, X-Api*, *signature*, cookies) must refer to an "
        "environment variable: `Authorization: \"Bearer ${HOOK_TOKEN}\"`.",
    )
    allow_remote: bool = Field(
        default=True, description="False refuses any host but loopback (127.0.0.1, ::1, localhost): for tests and sandboxes."
    )

    @field_validator("headers")
    @classmethod
    def _no_literal_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        for name, header in value.items():
            if SENSITIVE_HEADER.search(name):
                check_literal(header, f"headers.{name}")
        return value

    @model_validator(mode="after")
    def _check_url(self) -> "NotificationsConfig":
        if self.webhook_url is None and not self.urls:
            raise ValueError("notifications: set webhook_url (a JSON POST) or urls (Apprise URLs), or both")
        for url in self.urls:
            check_apprise_url(url, self.allow_remote, literal=True)
        if self.webhook_url is None or is_reference(self.webhook_url):
            return self  # checked when it is resolved, in the process that sends
        check_webhook_url(self.webhook_url, self.allow_remote, literal=True)
        return self


# Apprise schemes that post to a URL of the user's own; every other scheme names a service whose
# URL holds its tokens (slack://TokenA/TokenB/TokenC, discord://id/token, mailto://user:pass@host).
PLAIN_APPRISE_SCHEMES = ("json", "jsons", "form", "forms", "xml", "xmls")


def check_apprise_url(url: str, allow_remote: bool, *, literal: bool) -> None:
    """A service URL refers to its credentials by `${NAME}`; a plain json/form/xml URL has a host
    (loopback only unless allow_remote) and no literal credentials, like webhook_url."""
    scheme = urlparse(REFERENCE.sub("x", url)).scheme if literal else urlparse(url).scheme
    if not scheme:
        if literal and references(url):
            return  # the whole URL by reference: checked when resolved
        raise ValueError(f"notifications.urls: {url[:12]}... is no Apprise URL (scheme://...)")
    if scheme.lower() in PLAIN_APPRISE_SCHEMES:
        http = ("https" if scheme.lower().endswith("s") else "http") + url[len(scheme):]
        check_webhook_url(http, allow_remote, literal=literal)
        return
    if not allow_remote:
        raise ValueError(f"notifications.urls: a {scheme}:// service is remote (allow_remote is false)")
    if literal and not references(url):
        raise ValueError(
            f"notifications.urls: the {scheme}:// URL holds its service's credentials literally; give them by environment "
            "variable instead: `${NAME}` (e.g. slack://${SLACK_TOKENS} or the whole URL as ${SLACK_URL}), so that flow-run "
            "parameters and manifests never hold them"
        )


def check_webhook_url(url: str, allow_remote: bool, *, literal: bool) -> None:
    """An http(s) URL with a host (loopback only unless allow_remote); in a config (`literal`), no
    credential-like query value or userinfo that is not a `${NAME}` reference."""
    parsed = urlparse(REFERENCE.sub("x", url) if literal else url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"webhook_url must be an http(s) URL with a host, got {parsed.scheme}://{parsed.hostname or ''}...")
    if not allow_remote and not _is_loopback(parsed.hostname):
        raise ValueError(f"webhook_url host {parsed.hostname} is not a loopback address (allow_remote is false)")
    if literal:
        check_url(url, "webhook_url")


class DeploymentConfig(StrictModel):
    """Where `tunepipe deploy` sends the pipeline's runs."""

    work_pool: str | None = Field(
        default=None, description="Work pool of the pipeline's runs; default the environment profile's `work_pool`."
    )
    work_queue: str | None = Field(default=None, description="Work queue within the pool (default: the pool's default queue).")
    stage_environments: dict[str, str] = Field(
        default_factory=dict,
        description="Stage → environment profile for stages that run elsewhere (e.g. `sft: single-gpu-24gb`): the run "
        "sends that stage, and the stages after it up to the next routed one, to the profile's work pool.",
    )
    concurrency_limit: int = Field(
        default=1, ge=1, description="Runs of the deployment at once; more are queued (ENQUEUE), never dropped."
    )
    job_variables: dict[str, object] = Field(
        default_factory=dict, description="Work-pool job variables (env, image, resources) for the pipeline's runs."
    )
    tags: list[str] = Field(default_factory=list, description="Extra tags on the deployment and its runs.")
