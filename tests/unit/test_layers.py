"""The layers never point up: the import graph read from the source, every import at any depth.

Bottom to top (each layer imports only from layers below it or its own):

    schemas      configs and records (with the package root and the bundled profiles)
    core         the stage machinery: artifacts, keys, graph, secrets, registry
    lm           the language-model library every stage and the server share (+ llama.cpp's toolchain)
    training     what trains: trainer, launchers, distributed, PEFT methods, memory plan
    stages       one folder per stage; a stage imports no other stage
    serving/ops  the server, and what runs the pipeline's operations
    flows        the Prefect flows and the CLI
    examples     the bundled examples

The graph is built with `ast` from the files, so function-level imports count (a circle hidden
inside a function is still a circle, and it still puts the imported module's code into a stage's
key). A planted upward import must fail the same check, so the check is shown to bite. Import
circles are held to a list that only shrinks. A function-level import is a heavy library's (HEAVY)
or says why on its line or the line above (tasks/, flows/; in schemas, imports of tunepipe code).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "tunepipe"
STAGES = ("data", "base_model", "pretrain", "sft", "reward", "align", "evaluate", "export", "deploy")
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("schemas", ("tunepipe.schemas", "tunepipe.environments")),
    ("core", ("tunepipe.tasks.core",)),
    ("lm", ("tunepipe.tasks.lm", "tunepipe.tasks.llamacpp")),
    ("training", ("tunepipe.tasks.training",)),
    ("stages", tuple(f"tunepipe.tasks.{stage}" for stage in STAGES)),
    ("serving/ops", ("tunepipe.tasks.serving", "tunepipe.tasks.ops")),
    ("flows", ("tunepipe.flows",)),
    ("examples", ("tunepipe.examples",)),
)
# Package roots without code of their own (the root holds only `__version__`): importable from anywhere.
NEUTRAL = ("tunepipe", "tunepipe.tasks")
OUTSIDE_PACKAGE = ("tests", "benchmarks", "build", "dist")


def package_sources(root: Path = ROOT) -> dict[str, str]:
    """{dotted module name: source} of every module of the package (the repository root is `tunepipe`)."""
    sources = {}
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in OUTSIDE_PACKAGE]
    paths = [p for p in root.glob("*.py") if p.name != "setup.py"] + [p for f in folders for p in f.rglob("*.py")]
    for path in sorted(paths):
        rel = path.relative_to(root)
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        sources[".".join([PACKAGE, *parts])] = path.read_text(encoding="utf-8")
    return sources


@functools.lru_cache(maxsize=None)  # parsed once: the planted cases change one module's source
def imported_modules(module: str, source: str, is_package: bool, known: frozenset[str]) -> list[tuple[str, int]]:
    """(module, line) of every package import in `source`, at any depth, relative ones resolved.
    `from a import b` counts as `a.b` when that is a module."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return [(name, line) for name, line in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def layer_of(module: str) -> int | None:
    """The layer's index, None for the neutral package roots; KeyError for a module no layer holds."""
    if module in NEUTRAL:
        return None
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise KeyError(module)


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "tasks" and parts[2] in STAGES else None


def violations(sources: dict[str, str], packages: set[str]) -> list[str]:
    """Every import that points up a layer, or from one stage into another (`packages`: the
    modules that are packages, where relative imports start)."""
    known = frozenset(sources)
    problems = []
    for module, source in sorted(sources.items()):
        here = layer_of(module)
        for target, line in imported_modules(module, source, module in packages, known):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                problems.append(f"{module}:{line} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
            elif stage_of(module) and stage_of(target) and stage_of(module) != stage_of(target):
                problems.append(f"{module}:{line} (stage {stage_of(module)}) imports {target} (stage {stage_of(target)})")
    return problems


def package_names(sources: dict[str, str], root: Path = ROOT) -> set[str]:
    """The modules that are packages (their `__init__.py`): their relative imports start at themselves."""
    names = {PACKAGE}
    for module in sources:
        rel = Path(*module.split(".")[1:])
        if (root / rel / "__init__.py").is_file():
            names.add(module)
    return names


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return package_sources()


def test_every_module_has_a_layer(sources):
    """A new folder must be placed in the order (here) before it can import anything."""
    unplaced = []
    for module in sources:
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == []
    assert "tunepipe.tasks.lm.modeling" in sources and "tunepipe.tasks.training.trainer" in sources


def test_no_import_points_up(sources):
    assert violations(sources, package_names(sources)) == []


PLANTED = [
    # a function-level import from the lm library into training (a hidden circle)
    ("tunepipe.tasks.lm.modeling", "\n\ndef _planted():\n    from tunepipe.tasks.training.trainer import write_json\n",
     "tunepipe.tasks.lm.modeling:{line} (lm) imports tunepipe.tasks.training.trainer (training)"),
    # a training module reaching the Prefect server helper (ops): every trained key would include it
    ("tunepipe.tasks.training.launcher", "\nfrom tunepipe.tasks.ops.prefect_server import start_server\n",
     "tunepipe.tasks.training.launcher:{line} (training) imports tunepipe.tasks.ops.prefect_server (serving/ops)"),
    # a validator's relative import of core
    ("tunepipe.schemas.data", "\n\ndef _planted():\n    from ..tasks.core import fingerprint\n",
     "tunepipe.schemas.data:{line} (schemas) imports tunepipe.tasks.core.fingerprint (core)"),
    # `import a.b` of a stage from the serving layer is fine, of serving from a stage is not
    ("tunepipe.tasks.deploy.stage", "\nimport tunepipe.tasks.serving.embedded\n",
     "tunepipe.tasks.deploy.stage:{line} (stages) imports tunepipe.tasks.serving.embedded (serving/ops)"),
    # one stage into another
    ("tunepipe.tasks.export.stage", "\n\ndef _planted():\n    from tunepipe.tasks.sft import train\n",
     "tunepipe.tasks.export.stage:{line} (stage export) imports tunepipe.tasks.sft.train (stage sft)"),
]


@pytest.mark.parametrize(("module", "planted", "expected"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_upward_import_fails(sources, module, planted, expected):
    """The real module's source with one more import appended: the check names exactly that import."""
    source = sources[module].rstrip("\n") + "\n" + planted
    line = next(i for i, text in enumerate(source.splitlines(), 1) if "import" in text and i > len(sources[module].rstrip("\n").splitlines()))
    assert violations({**sources, module: source}, package_names(sources)) == [expected.format(line=line)]


# Import circles still open. None is left (the last two, launcher <-> multinode <-> ray_launcher and the data stage
# <-> its engines, were broken by moving what they shared below them): any circle now fails the test.
KNOWN_CIRCLES: set[frozenset[str]] = set()


def import_circles(sources: dict[str, str], packages: set[str]) -> set[frozenset[str]]:
    """The strongly connected groups of more than one module in the import graph (Tarjan)."""
    known = frozenset(sources)
    graph = {m: {t for t, _ in imported_modules(m, s, m in packages, known) if t in sources and t != m and t not in NEUTRAL}
             for m, s in sources.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: set[frozenset[str]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.add(frozenset(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_new_import_circle(sources):
    assert import_circles(sources, package_names(sources)) == KNOWN_CIRCLES


def test_a_planted_circle_is_found(sources):
    """checks must not import encoding (encoding imports checks): planted inside a function, it is a circle."""
    module = "tunepipe.tasks.lm.checks"
    planted = sources[module] + "\n\ndef _planted():\n    from tunepipe.tasks.lm.encoding import encode_text\n"
    found = import_circles({**sources, module: planted}, package_names(sources))
    assert found - KNOWN_CIRCLES == {frozenset({"tunepipe.tasks.lm.checks", "tunepipe.tasks.lm.encoding"})}


LOWER_LAYERS = ("schemas", "core", "lm")
# Third-party libraries a function may import where it needs them, without a comment: each costs from tens of
# milliseconds to seconds to import (torch, transformers, prefect, mlflow: seconds), or is an optional extra that
# is not installed everywhere (vllm, llama_cpp, deepspeed, great_expectations, ...). Importing them at module level
# would put that cost on every `tunepipe` command, `tunepipe validate` and every CPU-only worker, and make a
# missing extra break modules that never use it. This is the one statement of that reason.
HEAVY = frozenset({
    "accelerate", "apprise", "bitsandbytes", "conversion", "datasets", "deepspeed", "evaluate", "fastapi", "flash_attn",
    "fsspec", "gguf", "great_expectations", "httpx", "huggingface_hub", "jinja2", "kernels", "liger_kernel", "llama_cpp",
    "llmcompressor", "lm_eval", "markdown_it", "matplotlib", "mlflow", "nltk", "numpy", "openai", "pandas", "peft",
    "PIL", "prefect", "pyarrow", "ray", "rouge_score", "sacrebleu", "safetensors", "scipy", "sentencepiece", "starlette",
    "tokenizers", "torch", "tqdm", "transformers", "trl", "uvicorn", "vllm", "wandb", "xgrammar",
})
# Where every function-level import must be a HEAVY library or say why (tasks/ and flows/); in the schemas layer
# only imports of tunepipe code are held to it.
SWEPT = ("tunepipe.tasks", "tunepipe.flows")
# Modules still waiting for the sweep, with their count of unexplained function-level imports: none is left. A
# count may only go down (lower it here when it does), to 0 and out of the list.
PENDING_INNER: dict[str, int] = {}


def _import_names(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""] if not node.level else [PACKAGE]  # a relative import is ours
    return [alias.name for alias in node.names]


def unexplained_inner_imports(sources: dict[str, str]) -> list[str]:
    """Imports inside a function without a comment saying why (on the line, or above the run of import lines
    it belongs to): in tasks/ and flows/ every import but a HEAVY library's, in the schemas layer every import
    of tunepipe code. They hide edges of the graph and make a reader wonder why; the reason to have one is a
    heavy import that most callers never need, a circle, or `tunepipe` start-up time."""
    lower = {index for index, (name, _) in enumerate(LAYERS) if name in LOWER_LAYERS}
    found = []
    for module, source in sorted(sources.items()):
        swept = module.startswith(SWEPT)
        if not swept and layer_of(module) not in lower:
            continue
        lines = source.splitlines()
        seen: set[int] = set()
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in seen:
                    continue
                seen.add(id(node))
                names = _import_names(node)
                ours = any(n == PACKAGE or n.startswith(PACKAGE + ".") for n in names)
                if swept and not ours and all(n.split(".")[0] in HEAVY for n in names):
                    continue
                if not swept and not ours:
                    continue
                above = node.lineno - 2
                while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
                    above -= 1
                if "#" not in lines[node.lineno - 1] and not (above >= 0 and lines[above].lstrip().startswith("#")):
                    found.append(f"{module}:{node.lineno}")
    return found


def pending(found: list[str]) -> dict[str, int]:
    return {prefix: sum(1 for f in found if f.split(":")[0] == prefix or f.startswith(prefix + ".")) for prefix in PENDING_INNER}


def test_inner_imports_say_why(sources):
    found = unexplained_inner_imports(sources)
    waiting = [f for f in found if any(f.split(":")[0] == p or f.startswith(p + ".") for p in PENDING_INNER)]
    assert [f for f in found if f not in waiting] == []
    assert pending(found) == PENDING_INNER, "fewer: lower the count in PENDING_INNER; more: say why at the new import"


def test_an_unexplained_inner_import_is_named(sources):
    module = "tunepipe.tasks.lm.pairs"
    planted = sources[module] + "\n\ndef _planted():\n    from tunepipe.tasks.lm.metrics import normalise\n    return normalise\n"
    explained = sources[module] + "\n\ndef _planted():\n    # why: planted\n    from tunepipe.tasks.lm.metrics import normalise\n    return normalise\n"
    line = len(planted.splitlines()) - 1
    assert unexplained_inner_imports({module: planted}) == [f"{module}:{line}"]
    assert unexplained_inner_imports({module: explained}) == []


@pytest.mark.parametrize(("module", "body", "named"), [
    # a stage importing a light standard-library module inside a function: it belongs at the top
    ("tunepipe.tasks.deploy.stage", "    import json\n    return json", True),
    # a CLI command importing tunepipe code lazily without saying why
    ("tunepipe.flows.cli.run", "    from tunepipe.tasks.core.stage import StageFailed\n    return StageFailed", True),
    # torch inside a function: the reason is HEAVY's, stated once
    ("tunepipe.tasks.serving.engine", "    import torch\n    return torch", False),
    ("tunepipe.flows.cli.run", "    from prefect import flow\n    return flow", False),
    # the schemas layer holds only tunepipe imports to it
    ("tunepipe.schemas.data", "    import json\n    return json", False),
])
def test_the_rule_in_tasks_and_flows(sources, module, body, named):
    planted = sources[module].rstrip("\n") + "\n\n\ndef _planted():\n" + body + "\n"
    line = len(planted.splitlines()) - 1
    assert unexplained_inner_imports({module: planted}) == ([f"{module}:{line}"] if named else [])
