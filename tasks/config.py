"""Loading the pipeline YAML: validation before any work, errors that name the field and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
QUICKSTART = EXAMPLES_DIR / "quickstart" / "pipeline.yaml"


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its field path."""


def field_path(loc: tuple[Any, ...]) -> str:
    """`('data', 'sources', 0, 'format')` → `data.sources[0].format`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _yaml_line(text: str | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the deepest YAML node along `loc` that exists."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            if match is None:
                key_node = next((k for k, _ in node.value if k.value == part), None)
                return key_node.start_mark.line + 1 if key_node else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def format_validation_error(error: ValidationError, *, text: str | None, source: str) -> str:
    lines = [f"{source}: {error.error_count()} problem(s)"]
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        where = field_path(loc)
        line = _yaml_line(text, loc)
        at = f" (line {line})" if line else ""
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not a field of this section)"
        lines.append(f"  {where}{at}: {message}")
    return "\n".join(lines)


def validate_yaml_mapping(model: type[M], data: Any, *, text: str | None, source: str, context: dict | None = None) -> M:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, text=text, source=source)) from None


def read_yaml(path: Path) -> tuple[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_pipeline_config(path: str | Path | None = None, *, workdir: str | None = None, environment: str | None = None):
    """Read and validate a pipeline YAML (the quickstart when `path` is None).

    Relative paths in the YAML resolve against the YAML's directory; `workdir` and
    `environment` given here (the CLI's --workdir/--env) replace the YAML's.
    """
    from schemas.pipeline import PipelineConfig  # stage schemas import late: they are many

    path = Path(path).resolve() if path is not None else QUICKSTART
    text, data = read_yaml(path)
    if isinstance(data, dict):
        if workdir is not None:
            data["workdir"] = str(Path(workdir).resolve())
        if environment is not None:
            data["environment"] = environment
    config = validate_yaml_mapping(PipelineConfig, data, text=text, source=str(path), context={"base_dir": str(path.parent)})
    from tasks.environment import load_environment

    try:
        load_environment(config.environment)  # fail before any work, not when the first stage starts
    except ConfigError as exc:
        raise ConfigError(f"{path}: environment: {exc}") from None
    return config
