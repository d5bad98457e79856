"""The CLI on the bundled quickstart, as a user runs it: first run, cached rerun, partial reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

QUICKSTART = REPO / "examples" / "quickstart" / "pipeline.yaml"


def tunepipe(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tunepipe {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def run_json(*args: str, cwd: Path) -> dict:
    proc = tunepipe("run", *args, "--json", cwd=cwd)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def portable_copy(tmp_path: Path, **section_updates) -> Path:
    """The quickstart YAML with absolute source paths, so it can live elsewhere and be edited."""
    config = yaml.safe_load(QUICKSTART.read_text())
    for source in config["data"]["sources"]:
        source["path"] = str((QUICKSTART.parent / source["path"]).resolve())
    for section, updates in section_updates.items():
        config[section].update(updates)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    return cwd, run_json(cwd=cwd)


def test_first_run_computes_every_stage(first_run):
    cwd, summary = first_run
    assert summary["workdir"] == str((cwd / "runs" / "quickstart").resolve())
    assert list(summary["stages"]) == ["data", "base_model"]
    for name, stage in summary["stages"].items():
        assert stage["cached"] is False
        assert Path(stage["path"]) == Path(summary["workdir"]) / "artifacts" / name / stage["key"]
        assert (Path(stage["path"]) / "manifest.json").is_file()
    data = summary["stages"]["data"]["metrics"]
    assert data["read"] == data["kept"] + data["rejected"] and data["rejected"] > 0
    assert summary["stages"]["base_model"]["metrics"]["num_parameters"] > 0
    assert len(summary["run_id"]) == 36


def test_unchanged_rerun_reports_every_stage_cached(first_run):
    cwd, first = first_run
    second = run_json(cwd=cwd)
    assert second["run_id"] != first["run_id"]
    assert {name: s["cached"] for name, s in second["stages"].items()} == {"data": True, "base_model": True}
    assert {n: s["key"] for n, s in second["stages"].items()} == {n: s["key"] for n, s in first["stages"].items()}
    assert second["stages"]["data"]["metrics"] == first["stages"]["data"]["metrics"]


def test_downstream_change_reruns_only_downstream(first_run, tmp_path):
    cwd, first = first_run
    workdir = first["workdir"]
    base_seed = yaml.safe_load(QUICKSTART.read_text())["base_model"].get("seed", 0)
    changed = run_json(str(portable_copy(tmp_path, base_model={"seed": base_seed + 1})), "--workdir", workdir, cwd=cwd)
    assert changed["stages"]["data"]["cached"] is True
    assert changed["stages"]["data"]["key"] == first["stages"]["data"]["key"]
    assert changed["stages"]["base_model"]["cached"] is False
    assert changed["stages"]["base_model"]["key"] != first["stages"]["base_model"]["key"]


def test_until_and_from(first_run):
    cwd, first = first_run
    until = run_json("--until", "data", cwd=cwd)
    assert list(until["stages"]) == ["data"] and until["stages"]["data"]["cached"] is True
    refreshed = run_json("--from", "base_model", cwd=cwd)
    assert refreshed["stages"]["data"]["cached"] is True
    assert refreshed["stages"]["base_model"]["cached"] is False
    assert refreshed["stages"]["base_model"]["key"] == first["stages"]["base_model"]["key"]


def test_config_error_exits_2_naming_the_field(tmp_path):
    path = portable_copy(tmp_path)
    path.write_text(path.read_text() + "sft_typo: {}\n")
    proc = tunepipe("run", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "sft_typo" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert test_command in readme, "README's test command and .ci/run have drifted apart"


def test_data_gate_failure_names_expectation_count_and_rejected_file(tmp_path):
    path = portable_copy(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["data"]["max_rejected_fraction"] = 0.01
    config["workdir"] = str(tmp_path / "work")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = tunepipe("run", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    message = proc.stderr.split("tunepipe: stage failed:")[-1]
    assert "max_rejected_fraction" in message and "rejected.jsonl" in message
    rejected = next(Path(tmp_path / "work" / "artifacts" / "data" / ".staging").glob("*/rejected.jsonl"))
    assert rejected.read_text().count("\n") > 0
    assert not [p for p in (tmp_path / "work" / "artifacts" / "data").iterdir() if not p.name.startswith(".")]
