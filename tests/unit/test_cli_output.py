"""The command line as a shell user meets it: `--version`, and output into a closed pipe."""

from __future__ import annotations

import os
import subprocess
import sys

from tunepipe import __version__


def _tunepipe(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tunepipe.flows.cli.main", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_version_prints_the_installed_version():
    done = _tunepipe("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"tunepipe {__version__}"
    assert __version__ != "0+unknown"


def test_output_into_a_closed_pipe_ends_quietly():
    # `tunepipe envs | head -1` with the reader already gone: the first write meets EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tunepipe.flows.cli.main", "envs"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert "BrokenPipeError" not in done.stderr
    assert done.returncode == 0
