"""Editing a shared module changes the keys of exactly the stages that run it, directly or not.

The tunepipe sources are copied to a temporary tree, imported from there in a child process
(so the edit cannot touch the checkout), and every stage's code identity is computed before and
after appending one statement to a module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGES = ("data", "base_model", "pretrain", "sft", "reward", "align", "evaluate", "export", "deploy")
PROBE = """
import json, sys
from tunepipe.tasks.core.fingerprint import code_identity
print(json.dumps({s: code_identity(f"tunepipe.tasks.{s}.stage").version for s in sys.argv[1:]}))
"""


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("copy")
    target = root / "tunepipe"
    target.mkdir()
    shutil.copy(REPO / "__init__.py", target / "__init__.py")
    for folder in ("tasks", "flows", "schemas", "environments", "examples"):
        shutil.copytree(REPO / folder, target / folder, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "*.csv", "*.txt"))
    return root


def stage_versions(root: Path) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *STAGES], cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    )
    versions = json.loads(out.stdout.strip().splitlines()[-1])
    return versions


def changed_by_edit(root: Path, module: str) -> set[str]:
    path = root / "tunepipe" / Path(*module.split(".")).with_suffix(".py")
    before = stage_versions(root)
    original = path.read_text()
    try:
        path.write_text(original + "\n_EDITED_BY_TEST = 1\n")
        after = stage_versions(root)
    finally:
        path.write_text(original)
    return {stage for stage in STAGES if before[stage] != after[stage]}


def test_copy_is_imported_not_the_checkout(source_copy):
    out = subprocess.run(
        [sys.executable, "-c", "import tunepipe.tasks.core.stage as m; print(m.__file__)"], cwd=source_copy,
        env={"PYTHONPATH": str(source_copy), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip().startswith(str(source_copy))


@pytest.mark.parametrize(
    "module, expected",
    [
        # The loader every training stage uses (the edit that once left sft cached), and the
        # base_model stage, which builds its LlamaConfig there.
        ("tasks.lm.modeling", {"base_model", "pretrain", "sft", "reward", "align", "evaluate", "export"}),
        # The sft training job: imported by no stage module, reached through the ENTRYPOINT string.
        ("tasks.sft.train", {"sft"}),
        # Data cleaning: the data stage alone.
        ("tasks.data.clean", {"data"}),
        # The adapter registry: deploy, and evaluate (its `serving` baseline reads the registry).
        ("tasks.core.registry", {"evaluate", "deploy"}),
        # The contract itself: every stage.
        ("tasks.core.stage", set(STAGES)),
        # The CLI and the Prefect wrapper compute nothing a stage publishes.
        ("flows.cli.run", set()),
        ("tasks.core.prefect_stage", set()),
        # The Prefect server helper (tunepipe up) is ops: no trained artifact depends on it.
        ("tasks.ops.prefect_server", set()),
        # Experiment tracking watches runs (run_stage calls it): it re-keys nothing.
        ("tasks.core.tracking", set()),
    ],
)
def test_editing_a_module_changes_exactly_the_stages_that_run_it(source_copy, module, expected):
    assert changed_by_edit(source_copy, module) == expected
