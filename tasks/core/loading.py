"""Reading what a user gives us: YAML files validated against a pydantic model, with errors that
name the field, the file and the line. No pipeline schema is imported here, so every stage can
use it without its key depending on the other stages' schemas."""

from __future__ import annotations

import json
import re
import stat
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
        elif not re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):  # a key that would blur the path: quoted
            out += f"[{json.dumps(str(part))}]"
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


class StrictYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two YAML 1.1 surprises removed.

    - Booleans are YAML 1.2's: only true/false. `on`, `off`, `yes`, `no`, `y`, `n` stay strings,
      so `notifications: {on: [failure]}` has the key "on" and `country: no` is "no". (A boolean
      field still accepts them: pydantic reads "yes"/"on" as true where a bool is declared.)
    - A key given twice in one mapping is an error naming both lines, not "the last one wins".
      Merge keys (`<<: *defaults`) work: the mapping's own keys override the merged ones.
    """


StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", __import__("re").compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


MERGE_TAG = "tag:yaml.org,2002:merge"


def _no_duplicate_keys(loader: StrictYamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # Keys written in this mapping only: merge keys (`<<: *train`) bring in defaults that the
    # mapping's own keys override, which is what merging is for; construct_mapping merges them.
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.setdefault(key, line)
        except TypeError:  # an unhashable key: the constructor below names it
            continue
        if first != line:
            raise ConfigError(f"{key_node.start_mark.name}:{line}: duplicate key {key!r} (first given at line {first})")
    return loader.construct_mapping(node, deep=deep)


StrictYamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_yaml(text: str, source: str) -> Any:
    """YAML text → Python data, with StrictYamlLoader; errors as `source:line: problem`."""
    loader = None
    try:
        loader = StrictYamlLoader(text)  # reads the text at once: control characters fail here
        loader.name = source
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{source}:{line}: not valid YAML: character {exc.character!r} is not allowed (only printable text)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


MAX_TEXT_FILE_BYTES = 8 << 20  # a config or profile is a few KB: 8 MiB is generous, and bounds memory


def read_text_file(path: Path, what: str = "config file") -> str:
    """A user's text file, or a ConfigError that says why not (missing, a directory, a device or
    FIFO, over MAX_TEXT_FILE_BYTES, not UTF-8). A byte-order mark is accepted and dropped."""
    try:
        mode = path.stat().st_mode  # stat, not open: opening a FIFO would wait for a writer
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"
            raise ConfigError(f"{path}: is {kind}, not a {what} (give a regular file)")
        with open(path, "rb") as handle:
            data = handle.read(MAX_TEXT_FILE_BYTES + 1)
        if len(data) > MAX_TEXT_FILE_BYTES:
            raise ConfigError(f"{path}: the {what} is larger than {MAX_TEXT_FILE_BYTES >> 20} MiB; is this the right file?")
        return data.decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what}") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the {what}") from None
    except UnicodeDecodeError as exc:
        text = exc.object[: exc.start]
        line = text.count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def read_yaml(path: Path, what: str = "config file") -> tuple[str, Any]:
    """The one reader of every YAML file a user gives us (pipeline configs, environment profiles)."""
    text = read_text_file(path, what)
    return text, parse_yaml(text, str(path))
