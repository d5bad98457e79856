"""Secrets in configs: given by reference, resolved only where they are used, never logged.

A config never holds a secret's value. Fields that carry one (a webhook's query token or
authorization header, the serving API key) hold a reference, `${NAME}`, to an environment
variable of the process that uses it. The config is what Prefect stores as the flow run's
parameters and what manifests record, so references are all they ever see; `resolve` turns a
reference into its value at the moment of use, in memory, and remembers the value so that
`redact` can mask it in any log line that still carries it. Log lines are redacted as a whole:
URL query values and userinfo that look like credentials, and `Bearer ...`, become `***`.
"""

from __future__ import annotations

import logging
import os
import re
import threading

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Names of headers, query parameters and fields whose values are credentials.
SENSITIVE_NAME = re.compile(r"auth|token|key|secret|passw|pwd|cookie|sig|credential|session|bearer", re.IGNORECASE)
# Header names whose values are credentials: the names above, and API-key headers that do not
# say "key" (`X-Api`, `X-API-Id`, signatures).
SENSITIVE_HEADER = re.compile(SENSITIVE_NAME.pattern + r"|^x-api|api[-_]?id|signature|private", re.IGNORECASE)
# Query parameter names whose values are credentials: the names above, and Azure Functions' `code`.
SENSITIVE_QUERY = re.compile(SENSITIVE_NAME.pattern + r"|^code$", re.IGNORECASE)
MASK = "***"

# Webhook URLs whose path is the credential: Slack (/services/T…/B…/XXXX), Discord
# (/api/webhooks/ID/TOKEN), Microsoft Teams (…webhook.office.com/webhookb2/…, outlook.office.com/webhook/…).
_WEBHOOK_PATH = re.compile(
    r"((?:hooks\.slack\.com/(?:services|workflows|triggers)|discord(?:app)?\.com/api/webhooks|"
    r"[\w.-]*webhook\.office\.com/webhook\w*|outlook\.office(?:365)?\.com/webhook\w*)/)[^\s'\"?#]+",
    re.IGNORECASE,
)

_QUERY_SECRET = re.compile(r"([?&][^=&#\s]*(?:auth|token|key|secret|passw|pwd|sig|credential|session)[^=&#\s]*=)[^&#\s'\"]+", re.IGNORECASE)
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
_BEARER = re.compile(r"(\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)
# A credential header's quoted value, as in a dict's repr or JSON: {"Authorization": "..."}.
_HEADER_LINE = re.compile(r"((?:authorization|api[-_]?key|x-api[\w-]*|token|cookie)['\"]\s*[:=]\s*['\"])[^'\"]+", re.IGNORECASE)

_known_values: set[str] = set()
_lock = threading.Lock()


class SecretMissing(ValueError):
    """A referenced environment variable is not set in the process that needs it."""


def references(text: str) -> list[str]:
    """The environment variable names `text` refers to."""
    return REFERENCE.findall(text)


def is_reference(text: str | None) -> bool:
    """True when `text` is exactly one `${NAME}` reference."""
    return text is not None and REFERENCE.fullmatch(text.strip()) is not None


def resolve(text: str, what: str) -> str:
    """`text` with every `${NAME}` replaced by that environment variable's value (kept in memory
    only, and registered for redaction). `what` names the field in the error."""

    def value_of(match: re.Match) -> str:
        name = match.group(1)
        value = os.environ.get(name)
        if not value:
            raise SecretMissing(f"{what}: the environment variable {name} is not set")
        remember(value)
        return value

    return REFERENCE.sub(value_of, text)


def remember(value: str) -> None:
    """Mask `value` in every log line from now on (values shorter than 4 characters are not
    masked: they would mask ordinary words)."""
    if len(value) >= 4:
        with _lock:
            _known_values.add(value)
        install_log_redaction()


def redact(text: str) -> str:
    """Mask known secret values, credential-like URL parts and authorization headers in `text`."""
    for value in sorted(_known_values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _WEBHOOK_PATH.sub(rf"\1{MASK}", text)
    text = _QUERY_SECRET.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    return _HEADER_LINE.sub(rf"\1{MASK}", text)


def redact_url(url: str) -> str:
    """A URL fit for a log line: scheme, host and port, and the path only when nothing in it
    looks like a credential; query and userinfo dropped."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    located = f"{host}{parts.path}"  # with the host: a webhook's path is its secret only on its host
    path = parts.path if parts.path and redact(located) == located and len(parts.path) <= 64 else ("/…" if parts.path else "")
    return f"{parts.scheme}://{host}{port}{path}{'?…' if parts.query else ''}"


def check_literal(value: str, what: str) -> str:
    """Refuse a credential given as a literal: it would be stored with the config."""
    if value and not references(value):
        raise ValueError(
            f"{what} holds a literal credential; give it by environment variable instead: `${{NAME}}` "
            "(e.g. \"Bearer ${WEBHOOK_TOKEN}\"), so that flow-run parameters and manifests never hold it"
        )
    return value


def check_url(url: str, what: str, *, userinfo: bool = True) -> str:
    """Refuse a URL that carries a literal credential, which would be stored with the config (in
    flow-run parameters, manifests, deployment records) and printed: userinfo (`user:pass@`), a
    credential-like query value (`?api_key=…`, `?token=…`, `?sig=…`), or a webhook whose path is
    its secret (Slack, Discord, Teams). Each must be a `${NAME}` reference instead. `userinfo=False`
    refuses userinfo even by reference: for endpoints whose key travels as a Bearer token (Basic
    auth from the URL would replace it)."""
    from urllib.parse import parse_qsl, urlsplit

    if is_reference(url):
        return url  # the whole URL by reference: checked where it is resolved
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{what}: not a URL ({exc})") from None
    if "@" in parts.netloc:
        credentials = parts.netloc.rpartition("@")[0]
        if not userinfo:
            raise ValueError(
                f"{what} holds credentials before the host (user:password@): remove them and give the key by "
                "environment variable (api_key_env), sent as a Bearer token; a URL is stored with the run"
            )
        user, colon, password = credentials.partition(":")
        secret = password if colon else user  # `https://TOKEN@host` carries the token as the user
        if not is_reference(secret):
            _refuse(f"{what} userinfo (user:password@)")
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if SENSITIVE_QUERY.search(name) and value and not is_reference(value):
            _refuse(f"{what} query parameter {name}")
    if _WEBHOOK_PATH.search(f"{parts.netloc}{parts.path}") and not references(parts.path):
        _refuse(f"{what} (a webhook whose path is its secret)", example=f"the whole URL: `${{WEBHOOK_URL}}`")
    return url


def url_parts(url: str, what: str) -> tuple[str, dict[str, str]]:
    """A configured base URL, its `${NAME}` references resolved, split into the base without its
    query and the query's parameters: request paths go after the base's path and the parameters
    (Azure's `?api-version=`, a `?token=${T}`) ride along on every request, instead of the path
    being appended after the query (`/?token=…/v1/models`)."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    parts = urlsplit(resolve(url, what))
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return base, dict(parse_qsl(parts.query, keep_blank_values=True))


def _refuse(what: str, example: str = "") -> None:
    hint = f" ({example})" if example else ""
    raise ValueError(
        f"{what} holds a literal credential; give it by environment variable instead: `${{NAME}}`{hint}, "
        "so that flow-run parameters, manifests and logs never hold it"
    )


class _RedactingRecordFactory:
    """Wraps the log record factory: each record's message is redacted once, in place."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        record = self.inner(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logging module's to report
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if redact(str(exc)) != str(exc):  # tracebacks carry URLs too: keep the type, drop the text
                record.exc_text = f"{type(exc).__name__}: {redact(str(exc))}"
        return record


def install_log_redaction() -> None:
    """Redact every log record of this process (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(factory))
