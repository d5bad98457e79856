"""One stem, one meaning (README, "Layers"): `plan` is the memory plan, `registry` the adapter registry,
`deploy` the stage and `deployments` the Prefect deployments.

Held mechanically on the package's own names (modules, classes, functions and methods, module-level
names): a name built on one of these words lives where that meaning lives. A name elsewhere is a
second meaning (a stage selection called a "plan", a flow helper called "deploy", a table of align
methods called a "registry") and fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_PACKAGE = ("tests", "benchmarks", "build", "dist")

# word in a name -> (its meaning, the paths (files or folders) where names built on it may be defined)
OWNERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "plan": ("the memory plan", ("tasks/training/memory_plan.py", "flows/cli/plan.py")),
    "deploy": ("the deploy stage", ("tasks/deploy/", "schemas/deploy.py", "schemas/handoffs.py")),
    "deployments": ("the Prefect deployments", ("flows/", "schemas/operations.py", "tasks/ops/")),
    "registry": ("the adapter registry", ("tasks/core/registry.py", "schemas/registry.py", "flows/cli/registry.py",
                                          "tasks/deploy/", "schemas/deploy.py", "schemas/evaluate.py", "tasks/serving/settings.py")),
}
# Inflections that carry the same stem.
WORDS = {"plan": "plan", "plans": "plan", "deploy": "deploy", "deployment": "deployments", "deployments": "deployments",
         "registry": "registry", "registries": "registry"}
# Names still waiting for their rename: none. An entry that no longer exists fails, so the list only shrinks.
PENDING: set[str] = set()


def words(name: str) -> list[str]:
    """`serving_plan_from_registry` -> [serving, plan, from, registry]; `RunPlan` -> [run, plan]."""
    return [w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)]


@functools.lru_cache(maxsize=None)  # parsed once: the planted cases change one file
def defined_names(source: str) -> list[tuple[str, int]]:
    """(name, line) of every class, function and method, and every module-level assigned name."""
    tree = ast.parse(source)
    found = [(n.name, n.lineno) for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        found += [(t.id, node.lineno) for t in targets if isinstance(t, ast.Name)]
    return found


def owned(rel: str, stem: str) -> bool:
    return any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in OWNERS[stem][1])


def misnamed(files: dict[str, str]) -> list[str]:
    """`path:line name (stem: meaning)` for each name built on a stem outside that stem's owners
    (`files`: {path relative to the root: source}); a module's own file name counts at line 0."""
    problems = []
    for rel, source in sorted(files.items()):
        names = [(Path(rel).stem, 0), *defined_names(source)]
        for name, line in names:
            for stem in sorted({WORDS[w] for w in words(name) if w in WORDS}):
                if not owned(rel, stem) and f"{rel} {name}" not in PENDING:
                    problems.append(f"{rel}:{line} {name} ({stem}: {OWNERS[stem][0]})")
    return problems


@functools.cache  # read once; the planted cases copy it
def package_files() -> dict[str, str]:
    folders = [p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in OUTSIDE_PACKAGE]
    paths = [p for p in ROOT.glob("*.py") if p.name != "setup.py"] + [p for f in folders for p in f.rglob("*.py")]
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in sorted(paths)}


def test_each_stem_has_one_meaning():
    files = package_files()
    assert "tasks/training/memory_plan.py" in files and "flows/deployments.py" in files
    assert misnamed(files) == []


def test_pending_names_still_exist():
    """An entry of PENDING that was renamed must be struck from the list."""
    files = package_files()
    for entry in PENDING:
        rel, name = entry.split(" ")
        assert name in {n for n, _ in defined_names(files[rel])}, f"{entry} is gone: strike it from PENDING"


@pytest.mark.parametrize(("rel", "planted", "expected"), [
    # the stage selection under its old name
    ("tasks/core/selection.py", "\n\nclass RunPlan:\n    pass\n", "RunPlan (plan: the memory plan)"),
    # a flow helper named after the stage
    ("flows/deployments.py", "\n\ndef deploy():\n    pass\n", "deploy (deploy: the deploy stage)"),
    # a table of align methods called a registry
    ("tasks/align/methods/units.py", "\n\nMETHOD_REGISTRY = {}\n", "METHOD_REGISTRY (registry: the adapter registry)"),
    # Prefect deployments below the flows
    ("tasks/core/stage.py", "\n\ndef deployment_name():\n    pass\n", "deployment_name (deployments: the Prefect deployments)"),
])
def test_a_second_meaning_is_named(rel, planted, expected):
    files = package_files()
    source = files[rel].rstrip("\n") + "\n" + planted
    line = next(i for i, text in enumerate(source.splitlines(), 1) if i > len(files[rel].rstrip("\n").splitlines()) and text.strip())
    assert misnamed({**files, rel: source}) == [f"{rel}:{line} {expected}"]


def test_a_module_file_counts_as_a_name():
    assert misnamed({"tasks/align/methods/registry.py": ""}) == ["tasks/align/methods/registry.py:0 registry (registry: the adapter registry)"]
    assert misnamed({"tasks/core/registry.py": ""}) == []
