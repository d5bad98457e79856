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


def minimal_pipeline(tmp_path: Path, extra: str = "", top: str = "") -> Path:
    """A valid pipeline YAML (a data stage on one JSONL file) with `extra` sections appended."""
    (tmp_path / "d.jsonl").write_text('{"instruction": "q?", "output": "a"}\n')
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"name: p\nworkdir: work\n{top}data:\n  sources:\n    - {{path: d.jsonl, task: t}}\n{extra}")
    return path


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


# -- item 7: YAML merge keys -----------------------------------------------------------------

def test_yaml_merge_keys_merge_and_own_keys_override():
    text = "defaults: &train\n  lr: 0.1\n  steps: 5\nsft:\n  <<: *train\n  steps: 9\n"
    assert loading.parse_yaml(text, "p.yaml") == {"defaults": {"lr": 0.1, "steps": 5}, "sft": {"lr": 0.1, "steps": 9}}


def test_duplicate_keys_are_still_refused_next_to_a_merge():
    text = "defaults: &train\n  lr: 0.1\nsft:\n  <<: *train\n  steps: 9\n  steps: 10\n"
    with pytest.raises(loading.ConfigError, match="p.yaml:6: duplicate key 'steps' \\(first given at line 5\\)"):
        loading.parse_yaml(text, "p.yaml")


# -- item 8: finite numbers, booleans are not numbers ----------------------------------------

@pytest.mark.parametrize("field, value, problem", [
    ("learning_rate", ".inf", "finite number"),
    ("learning_rate", ".nan", "finite number"),
    ("max_steps", "true", "true is a boolean, not a number"),
    ("max_steps", "false", "false is a boolean, not a number"),
])
def test_numbers_are_finite_and_booleans_are_not_numbers(tmp_path, field, value, problem, capsys):
    config = minimal_pipeline(tmp_path, f"sft:\n  model: owner/model\n  training:\n    {field}: {value}\n")
    assert run_cli(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"sft.training.{field} (line 9)" in err and problem in err


# -- item 9: the top-level seed reseeds every stage ------------------------------------------

def seeded_pipeline(tmp_path: Path, top: str, extra: str = "") -> Path:
    sft = "sft:\n  model: owner/model\n" + extra
    return minimal_pipeline(tmp_path, sft, top=top)


def test_the_global_seed_reaches_every_stage_seed_and_key(tmp_path):
    from tunepipe.tasks.core.config import load_pipeline_config
    from tunepipe.tasks.data.stage import DataStage

    def load(top: str, extra: str = ""):
        return load_pipeline_config(seeded_pipeline(tmp_path, top, extra))

    seven, forty_two, unset = load("seed: 7\n"), load("seed: 42\n"), load("")
    assert (seven.data.split.seed, seven.data.dedup.seed, seven.data.mix.seed, seven.sft.training.seed) == (7, 7, 7, 7)
    assert forty_two.data.split.seed == 42 and unset.data.split.seed == 0  # the stage default when no seed is written
    assert DataStage().key_payload(seven.data) != DataStage().key_payload(forty_two.data)
    own = load("seed: 7\n", "  training:\n    seed: 3\n")
    assert own.sft.training.seed == 3 and own.data.split.seed == 7  # a stage's own seed wins


# -- item 10: an unset ${NAME} is a config error naming it -----------------------------------

def test_an_unset_reference_anywhere_is_a_config_error_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TUNEPIPE_SURELY_UNSET", raising=False)
    path = tmp_path / "pipeline.yaml"
    minimal_pipeline(tmp_path)
    path.write_text(path.read_text().replace("workdir: work", "workdir: ${TUNEPIPE_SURELY_UNSET}/x"))
    assert run_cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "workdir (line 2): ${TUNEPIPE_SURELY_UNSET} refers to the environment variable TUNEPIPE_SURELY_UNSET, which is not set" in err
    assert not (tmp_path / "${TUNEPIPE_SURELY_UNSET}").exists()
    monkeypatch.setenv("TUNEPIPE_SURELY_UNSET", "set")
    assert run_cli(["validate", str(path)]) == 0


# -- item 11 and 13: expected failures are one `tunepipe:` line; --debug shows the traceback --

def cli_subprocess(args: list[str], cwd: Path) -> tuple[int, str]:
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(REPO.parent)
    proc = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def _sys_refuses_mkdir() -> bool:
    """/sys is read-only in containers and for users, even for root: an unwritable path that
    needs no chmod (root ignores permissions)."""
    try:
        os.mkdir("/sys/tunepipe-probe")
    except OSError:
        return True
    os.rmdir("/sys/tunepipe-probe")
    return False


@pytest.mark.skipif(not _sys_refuses_mkdir(), reason="needs a path that refuses mkdir")
def test_an_unwritable_workdir_is_one_line_naming_the_path(tmp_path):
    config = minimal_pipeline(tmp_path)
    config.write_text(config.read_text().replace("workdir: work", "workdir: /sys/tunepipe-nowhere/work"))
    rc, err = cli_subprocess(["run", str(config), "--until", "data"], tmp_path)
    assert rc == 1 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("tunepipe: cannot write /sys/tunepipe-nowhere") and "--workdir" in lines[-1], err
    rc, err = cli_subprocess(["--debug", "run", str(config), "--until", "data"], tmp_path)
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("tunepipe: cannot write")


def test_a_missing_model_directory_and_an_offline_hub_id_say_how_to_fix_them(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from tunepipe.tasks.core.stage import StageFailed
    from tunepipe.tasks.lm import modeling
    from tunepipe.tasks.training import memory_plan

    with pytest.raises(StageFailed, match="no such local model directory, and not a hub id.*config.json"):
        modeling.load_tokenizer(tmp_path / "missing-model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StageFailed, match="HF_HUB_OFFLINE=1 and the model is not in the local hub cache.*hf download someorg/nothing-here"):
        modeling.load_model("someorg/nothing-here")
    with pytest.raises(StageFailed, match="not in the local hub cache"):
        memory_plan.model_config("someorg/nothing-here")  # the sft stage's memory plan reads the config first
    assert modeling.model_fingerprint("someorg/nothing-here") == "hub:someorg/nothing-here@main"  # keys need no download


def test_a_logged_stage_failure_keeps_its_line_and_drops_its_traceback(caplog):
    import logging

    from tunepipe.tasks.core.stage import StageFailed, quiet_expected_failures

    saved = logging.getLogRecordFactory()
    try:
        quiet_expected_failures()
        try:
            raise StageFailed("sft: the model is missing")
        except StageFailed:
            logging.getLogger("prefect.task_runs").error("Task run failed with exception", exc_info=True)
        try:
            raise KeyError("a bug")
        except KeyError:
            logging.getLogger("prefect.task_runs").error("Task run failed with exception", exc_info=True)
    finally:
        logging.setLogRecordFactory(saved)
    expected, bug = caplog.records[-2:]
    assert expected.exc_info is None and bug.exc_info is not None  # a bug keeps its traceback


def test_unset_reference_errors_have_the_shape_of_every_config_error(tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.delenv("NOPE", raising=False)
    path = minimal_pipeline(tmp_path, "notifications:\n  webhook_url: http://127.0.0.1:9/x?token=${NOPE}\n")
    assert run_cli(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "tunepipe: config error" and lines[1].startswith(f"{path}: 1 problem(s)")
    assert [line for line in lines[2:] if line.strip()] == [
        "  notifications.webhook_url (line 7): ${NOPE} refers to the environment variable NOPE, which is not set"]
    assert all(re.match(r"  [A-Za-z_\[].*?( \(line \d+\))?: \S", line) for line in lines[2:])


def test_a_missing_local_model_directory_is_a_config_error_at_validate(tmp_path, capsys):
    path = minimal_pipeline(tmp_path, "sft:\n  model: ./no-such-model-dir\n")
    assert run_cli(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "sft.model (line 7): Value error, './no-such-model-dir': no such local model directory" in err
    (tmp_path / "no-such-model-dir").mkdir()
    assert run_cli(["validate", str(path)]) == 0
