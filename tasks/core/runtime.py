"""Process-wide settings for an offline, isolated run. Call before Prefect is imported.

Prefect reads its settings from the environment when it is first imported, so the CLI calls
`configure_runtime` with the workdir first and imports the flows afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    from tunepipe.tasks.core.secrets import install_log_redaction

    install_log_redaction()  # credential-shaped URL parts and headers never reach a log line
