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
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from tunepipe.schemas.secret_refs import MASK, REFERENCE, mask_credentials

_known_values: set[str] = set()
_lock = threading.Lock()


class SecretMissing(ValueError):
    """A referenced environment variable is not set in the process that needs it."""


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
    return mask_credentials(text)


def redact_url(url: str) -> str:
    """A URL fit for a log line: scheme, host and port, and the path only when nothing in it
    looks like a credential; query and userinfo dropped."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    located = f"{host}{parts.path}"  # with the host: a webhook's path is its secret only on its host
    path = parts.path if parts.path and redact(located) == located and len(parts.path) <= 64 else ("/…" if parts.path else "")
    return f"{parts.scheme}://{host}{port}{path}{'?…' if parts.query else ''}"


def url_parts(url: str, what: str) -> tuple[str, dict[str, str]]:
    """A configured base URL, its `${NAME}` references resolved, split into the base without its
    query and the query's parameters: request paths go after the base's path and the parameters
    (Azure's `?api-version=`, a `?token=${T}`) ride along on every request, instead of the path
    being appended after the query (`/?token=…/v1/models`)."""
    parts = urlsplit(resolve(url, what))
    base = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return base, dict(parse_qsl(parts.query, keep_blank_values=True))


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
