"""Loading the pipeline YAML: validation before any work, errors that name the field and line."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.loading import ConfigError, _yaml_line, field_path, read_yaml, validate_yaml_mapping
from tunepipe.schemas.secret_refs import references


def quickstart_config() -> Path:
    """The bundled quickstart's pipeline YAML: package data, found the same way in a source
    checkout, an editable install and a wheel."""
    return Path(str(files("tunepipe.examples.quickstart") / "pipeline.yaml"))


def load_pipeline_config(
    path: str | Path | None = None,
    *,
    workdir: str | None = None,
    environment: str | None = None,
    overrides: dict[str, Any] | None = None,
):
    """Read and validate a pipeline YAML (the quickstart when `path` is None).

    Relative paths in the YAML resolve against the YAML's directory; `workdir` and
    `environment` given here (the CLI's --workdir/--env) replace the YAML's, and `overrides`
    (a deployed run's parameter) is merged into it before validation (see `apply_overrides`).
    """
    from tunepipe.schemas.pipeline import PipelineConfig  # here: it builds every stage's config model, which commands that read no YAML skip

    path = Path(path).resolve() if path is not None else quickstart_config()
    text, data = read_yaml(path)
    if isinstance(data, dict):
        if overrides:
            data = apply_overrides(data, overrides)
        if workdir is not None:
            data["workdir"] = str(Path(workdir).resolve())
        if environment is not None:
            data["environment"] = environment
    unset_references(data, text, str(path))
    config = validate_yaml_mapping(PipelineConfig, data, text=text, source=str(path), context={"base_dir": str(path.parent)})

    try:
        load_environment(config.environment)  # fail before any work, not when the first stage starts
    except ConfigError as exc:
        raise ConfigError(f"{path}: environment: {exc}") from None
    return config


def unset_references(data: Any, text: str | None, source: str) -> None:
    """A ConfigError naming every `${NAME}` whose environment variable is not set, with its field
    and line: otherwise `workdir: ${UNSET}/x` makes a directory literally named `${UNSET}`, and a
    secret reference fails only when a late stage first uses it."""
    problems = []
    for loc, value in _strings(data, ()):
        for name in references(value):
            if not os.environ.get(name):
                line = _yaml_line(text, loc)
                at = f" (line {line})" if line else ""
                problems.append(f"  {field_path(loc)}{at}: ${{{name}}} refers to the environment variable {name}, which is not set")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s) (set each variable in the environment of the process "
                          "that runs, or write the value)\n" + "\n".join(problems))


def _strings(node: Any, loc: tuple) -> Any:
    if isinstance(node, str):
        yield loc, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*loc, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, (*loc, index))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` merged in: mappings merge key by key, anything else replaces.

    A dotted key is a path (`{"sft.training.max_steps": 50}` is `{"sft": {"training":
    {"max_steps": 50}}}`), so one field can be set from the Prefect UI's parameter form. The
    result is validated like the YAML itself: a wrong key fails naming its path.
    """
    merged = dict(data)
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        current = merged.get(head)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[head] = apply_overrides(current, value)
        elif isinstance(value, dict):
            merged[head] = apply_overrides({}, value)
        else:
            merged[head] = value
    return merged
