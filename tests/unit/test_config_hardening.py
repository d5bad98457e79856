"""Config reading that means what it says (issue 29, items 6-11, 13)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tunepipe.flows.cli.main import main
from tunepipe.tasks.core import loading


def run_cli(argv: list[str], timeout: float = 60) -> int:
    """main(argv) in a thread, so that a hang fails the test instead of blocking it."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", main(argv)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"tunepipe {' '.join(argv)} did not return within {timeout}s"
    return result["rc"]


# -- item 6: non-regular files, bounded size -------------------------------------------------

def test_validate_refuses_a_device_without_reading_it(capsys):
    assert run_cli(["validate", "/dev/zero"], timeout=20) == 2
    assert "/dev/zero: is a device, not a config file" in capsys.readouterr().err


def test_validate_refuses_a_fifo_without_waiting_for_a_writer(tmp_path, capsys):
    fifo = tmp_path / "pipeline.yaml"
    os.mkfifo(fifo)
    assert run_cli(["validate", str(fifo)], timeout=20) == 2
    assert "is a FIFO, not a config file" in capsys.readouterr().err


def test_an_oversized_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "MAX_TEXT_FILE_BYTES", 1000)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 2000 + "\n")
    assert run_cli(["validate", str(big)]) == 2
    assert "is larger than" in capsys.readouterr().err


def test_a_config_with_a_bom_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: x\n")
    assert loading.read_yaml(path)[1] == {"name": "x"}
