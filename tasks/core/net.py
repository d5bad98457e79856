"""Small network helpers every layer may use (launchers, servers, the Prefect stack).

They live in core, not with the Prefect server helper: a training launcher that needs a free
rendezvous port must not import the ops layer, or every trained artifact's key would change
whenever the Prefect server helper does.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the OS's pick: bind to 0, read it back)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
