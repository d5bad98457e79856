"""Every path and module the prose names exists.

Docstrings, comments, the README, the benchmarks' notes, the examples and the generated schema reference
name code (`tasks/core/stage.py`, `tunepipe.tasks.lm.modeling`, `tasks.core.fingerprint.stage_key`,
`engines/base.py` inside its package). A module that moves leaves those behind, pointing a reader at nothing;
this test finds each such reference and checks that the file, the module and the name in it are there.
Nothing is allowed to point nowhere: a reference that cannot be fixed is reworded.
"""

from __future__ import annotations

import ast
import functools
import io
import os
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIPPED = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = (".md", ".yaml", ".yml", ".toml", ".cfg", ".txt")
TOP = ("tasks", "flows", "schemas", "environments", "examples", "benchmarks", "tests")

# tasks/core/stage.py, tunepipe/flows/cli/run.py, tests/helpers/vllm.py (from the repository root)
ROOT_PATH = re.compile(r"(?<![\w/.-])(?:tunepipe/)?((?:%s)/(?:[\w-]+/)*\w+\.py)\b" % "|".join(TOP))
# lm/encoding.py, engines/base.py: a path from inside the tree (README's layout, a package's own docstring)
TASKS_PATH = re.compile(r"(?<![\w/.-])((?:[a-z_]+/)+\w+\.py)\b")
# tunepipe.tasks.lm.modeling, tasks.core.fingerprint.stage_key, schemas.handoffs.GateVerdict, flows.pipeline
DOTTED = re.compile(r"(?<![\w.])(?:tunepipe\.)?((?:tasks|flows|schemas)(?:\.[A-Za-z_]\w*)+)(?![\w(])")


def python_prose(source: str) -> str:
    """The comments, docstrings and `description=`/`help=` texts of a module (a config field's description
    is its documentation in schemas/REFERENCE.md, a CLI option's help its documentation in `--help`)."""
    parts = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            parts.append(token.string)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
        elif isinstance(node, ast.keyword) and node.arg in ("description", "help"):
            parts += [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return "\n".join(parts)


def repository_files(root: Path) -> list[Path]:
    """The repository's files, without walking into the virtual environment, git's store or build output."""
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in SKIPPED and not d.endswith(".egg-info"))
        found += [Path(folder) / name for name in sorted(names)]
    return found


def prose_files(root: Path = ROOT) -> dict[str, str]:
    """{path relative to the root: its prose} for every Python and text file of the repository."""
    out = {}
    for path in repository_files(root):
        rel = path.relative_to(root)
        if path.suffix == ".py":
            out[str(rel)] = python_prose(path.read_text(encoding="utf-8"))
        elif path.suffix in TEXT_SUFFIXES and path.name != "constraints.txt":
            out[str(rel)] = path.read_text(encoding="utf-8")
    return out


@functools.lru_cache(maxsize=None)
def top_level_names(module_file: Path) -> frozenset[str]:
    """What `from module import X` can name: its classes, functions, assignments and imports."""
    names = set()
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def dotted_exists(name: str, root: Path = ROOT) -> bool:
    """`a.b.c.X.y`: the longest prefix that is a module or package, then (if anything follows) a name it
    defines (`tasks.core.stage.StageFailed` exists; a name the module does not define does not)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = root.joinpath(*parts[:i])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[i:]
            return not rest or rest[0] in top_level_names(module)
    return False


@functools.lru_cache(maxsize=None)
def repository_tree(root: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(every Python file's path, every folder's name) of the repository's own code."""
    files = [p.relative_to(root) for p in repository_files(root) if p.suffix == ".py"]
    return frozenset(str(f) for f in files), frozenset(part for f in files for part in f.parts[:-1])


def relative_path_exists(path: str, root: Path = ROOT) -> bool | None:
    """Whether `engines/base.py` is the tail of one of the repository's files; None when its first folder is
    not one of ours (`vllm/config/lora.py`, `conversion/gemma.py`: another project's source)."""
    files, folders = repository_tree(root)
    if path.split("/")[0] not in folders:
        return None
    return any(f == path or f.endswith("/" + path) for f in files)


def missing_references(files: dict[str, str], root: Path = ROOT) -> list[str]:
    """`file: reference` for each named path or module that is not there."""
    missing = []
    for rel, text in sorted(files.items()):
        for match in ROOT_PATH.finditer(text):
            if not (root / match.group(1)).is_file():
                missing.append(f"{rel}: {match.group(1)}")
        for match in TASKS_PATH.finditer(text):
            path = match.group(1)
            if path.split("/")[0] in TOP or path.startswith("tunepipe/"):
                continue  # ROOT_PATH's
            if relative_path_exists(path, root) is False:
                missing.append(f"{rel}: {path}")
        for match in DOTTED.finditer(text):
            if match.group(1).endswith(".py"):
                continue  # a file name (`a user's tasks.py`), not a module path
            if not dotted_exists(match.group(1), root):
                missing.append(f"{rel}: {match.group(1)}")
    return sorted(set(missing))


def test_every_named_path_and_module_exists():
    files = prose_files()
    assert "README.md" in files and "tasks/core/stage.py" in files
    assert missing_references(files) == []


def test_a_stale_reference_is_named():
    planted = {
        "tasks/x.py": '"""Moved from tasks/launcher.py; see tunepipe.tasks.lm.modeling and tasks.fingerprint.stage_key."""\n'
                      "# the key: tasks.core.fingerprint.stage_key, tasks.core.fingerprint.no_such_name\n"
                      'KEY = Field(description="see tasks.core.nowhere")\n',
        "README.md": "`training/modeling.py` holds it, beside `lm/encoding.py` (tasks/lm/encoding.py); vLLM's `vllm/config/lora.py`\n",
    }
    files = {rel: python_prose(text) if rel.endswith(".py") else text for rel, text in planted.items()}
    assert missing_references(files) == [
        "README.md: training/modeling.py",
        "tasks/x.py: tasks.core.fingerprint.no_such_name",
        "tasks/x.py: tasks.core.nowhere",
        "tasks/x.py: tasks.fingerprint.stage_key",
        "tasks/x.py: tasks/launcher.py",
    ]


def test_code_is_not_prose():
    """A variable's method call and a string of code are not references; comments and docstrings are."""
    source = 'def f(tasks):\n    """Reads schemas/no_such.py."""\n    x = "tasks/no_such.py"\n    return tasks.items()  # tasks.nowhere\n'
    assert missing_references({"tasks/y.py": python_prose(source)}) == ["tasks/y.py: schemas/no_such.py", "tasks/y.py: tasks.nowhere"]
