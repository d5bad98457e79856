"""Secret references in configs: the `${NAME}` syntax and the checks a config field passes.

A config never holds a secret's value, only a reference to an environment variable of the process
that uses it (tasks/core/secrets.py resolves and redacts them at run time). The validators of
schemas/ refuse literal credentials with these helpers; they live here, below tasks/core/, so that
the schemas import nothing above them.
"""

from __future__ import annotations

import re

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Names of headers, query parameters and fields whose values are credentials.
SENSITIVE_NAME = re.compile(r"auth|token|key|secret|passw|pwd|cookie|sig|credential|session|bearer", re.IGNORECASE)

# Header names whose values are credentials: the names above, and API-key headers that do not
# say "key" (`X-Api`, `X-API-Id`, signatures).
SENSITIVE_HEADER = re.compile(SENSITIVE_NAME.pattern + r"|^x-api|api[-_]?id|signature|private", re.IGNORECASE)

# Query parameter names whose values are credentials: the names above, and Azure Functions' `code`.
SENSITIVE_QUERY = re.compile(SENSITIVE_NAME.pattern + r"|^code$", re.IGNORECASE)

# Webhook URLs whose path is the credential: Slack (/services/T…/B…/XXXX), Discord
# (/api/webhooks/ID/TOKEN), Microsoft Teams (…webhook.office.com/webhookb2/…, outlook.office.com/webhook/…).
WEBHOOK_PATH = re.compile(
    r"((?:hooks\.slack\.com/(?:services|workflows|triggers)|discord(?:app)?\.com/api/webhooks|"
    r"[\w.-]*webhook\.office\.com/webhook\w*|outlook\.office(?:365)?\.com/webhook\w*)/)[^\s'\"?#]+",
    re.IGNORECASE,
)

MASK = "***"
QUERY_SECRET = re.compile(r"([?&][^=&#\s]*(?:auth|token|key|secret|passw|pwd|sig|credential|session)[^=&#\s]*=)[^&#\s'\"]+", re.IGNORECASE)
USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
BEARER = re.compile(r"(\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=-]{4,}", re.IGNORECASE)
# A credential header's quoted value, as in a dict's repr or JSON: {"Authorization": "..."}.
HEADER_LINE = re.compile(r"((?:authorization|api[-_]?key|x-api[\w-]*|token|cookie)['\"]\s*[:=]\s*['\"])[^'\"]+", re.IGNORECASE)


def references(text: str) -> list[str]:
    """The environment variable names `text` refers to."""
    return REFERENCE.findall(text)


def is_reference(text: str | None) -> bool:
    """True when `text` is exactly one `${NAME}` reference."""
    return text is not None and REFERENCE.fullmatch(text.strip()) is not None


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
    if WEBHOOK_PATH.search(f"{parts.netloc}{parts.path}") and not references(parts.path):
        _refuse(f"{what} (a webhook whose path is its secret)", example="the whole URL: `${WEBHOOK_URL}`")
    return url



def mask_credentials(text: str) -> str:
    """`text` with credential-like URL parts (userinfo, query tokens, a webhook's secret path) and
    authorization headers masked: what a literal credential looks like, without knowing its value."""
    text = USERINFO.sub(rf"\1{MASK}@", text)
    text = WEBHOOK_PATH.sub(rf"\1{MASK}", text)
    text = QUERY_SECRET.sub(rf"\1{MASK}", text)
    text = BEARER.sub(rf"\1{MASK}", text)
    return HEADER_LINE.sub(rf"\1{MASK}", text)

def _refuse(what: str, example: str = "") -> None:
    hint = f" ({example})" if example else ""
    raise ValueError(
        f"{what} holds a literal credential; give it by environment variable instead: `${{NAME}}`{hint}, "
        "so that flow-run parameters, manifests and logs never hold it"
    )
