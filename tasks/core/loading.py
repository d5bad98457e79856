"""Reading what a user gives us: YAML files validated against a pydantic model, with errors that
name the field, the file and the line. No pipeline schema is imported here, so every stage can
use it without its key depending on the other stages' schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


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
