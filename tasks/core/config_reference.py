"""The config reference (markdown), generated from the pydantic schemas' field descriptions."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _nested_models(arg)]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _default(field: FieldInfo) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`" if not isinstance(field.default, BaseModel) else "(section defaults)"
    if field.default_factory is not None:
        return "(section defaults)"
    return "required"


def model_reference(model: type[BaseModel], path: str, seen: set[str]) -> list[str]:
    lines = [f"### `{path}`", "", (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else "", ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | `{_type_name(field.annotation)}` | {_default(field)} | {field.description or ''} |")
        for sub in _nested_models(field.annotation):
            nested.append((f"{path}.{name}", sub))
    lines.append("")
    for sub_path, sub in nested:
        if sub_path not in seen:
            seen.add(sub_path)
            lines += model_reference(sub, sub_path, seen)
    return lines


def config_reference() -> str:
    # here: the pipeline schema builds every stage's config model, which only this command needs
    from tunepipe.schemas.environment import EnvironmentProfile
    from tunepipe.schemas.pipeline import PipelineConfig

    lines = [
        "# Config reference",
        "",
        "Generated from the schemas by `tunepipe config-reference`; do not edit by hand.",
        "",
        "## Pipeline YAML",
        "",
    ]
    lines += model_reference(PipelineConfig, "(top level)", set())
    lines += ["## Environment profile YAML", ""]
    lines += model_reference(EnvironmentProfile, "(profile)", set())
    return "\n".join(lines) + "\n"
