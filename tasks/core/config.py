"""Loading the pipeline YAML: validation before any work, errors that name the field and line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunepipe.tasks.core.loading import ConfigError, read_yaml, validate_yaml_mapping


def quickstart_config() -> Path:
    """The bundled quickstart's pipeline YAML: package data, found the same way in a source
    checkout, an editable install and a wheel."""
    from importlib.resources import files

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
    from tunepipe.schemas.pipeline import PipelineConfig

    path = Path(path).resolve() if path is not None else quickstart_config()
    text, data = read_yaml(path)
    if isinstance(data, dict):
        if overrides:
            data = apply_overrides(data, overrides)
        if workdir is not None:
            data["workdir"] = str(Path(workdir).resolve())
        if environment is not None:
            data["environment"] = environment
    config = validate_yaml_mapping(PipelineConfig, data, text=text, source=str(path), context={"base_dir": str(path.parent)})
    from tunepipe.tasks.core.environment import load_environment

    try:
        load_environment(config.environment)  # fail before any work, not when the first stage starts
    except ConfigError as exc:
        raise ConfigError(f"{path}: environment: {exc}") from None
    return config


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
