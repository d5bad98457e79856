"""Writing and reading the files one stage hands the next (`schemas/handoffs.py`): the one
writer and the one reader of each, validated on both sides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from tunepipe.schemas.handoffs import Handoff
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.stage import StageFailed

H = TypeVar("H", bound=Handoff)


def write_handoff(artifact_dir: str | Path, handoff: Handoff) -> Path:
    """Write `handoff` into the (staging) artifact directory under its file name."""
    path = Path(artifact_dir) / handoff.FILE
    # Fields left at their defaults are omitted (an sft artifact has no `sft_method`); the reader
    # restores them, so the file says only what the writer set.
    path.write_text(json.dumps(handoff.model_dump(mode="json", exclude_defaults=True), indent=1))
    return path


def read_handoff(ref: ArtifactRef | str | Path, model: type[H], *, reader: str) -> H:
    """The `model` file of an upstream artifact; a missing or malformed one fails the reading stage
    with a message that names the file and what was expected."""
    root = Path(ref.path if isinstance(ref, ArtifactRef) else ref)
    path = root / model.FILE
    if not path.is_file():
        raise StageFailed(f"{reader}: {path} is missing: {root} is not an artifact that hands over a {model.__name__}")
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise StageFailed(f"{reader}: {path} is not a valid {model.__name__}: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None


def read_manifest_config(ref: ArtifactRef | str | Path) -> dict[str, Any]:
    """The config payload an upstream artifact was made with (its manifest's `config`; {} when it
    has no manifest or a non-mapping config)."""
    path = Path(ref.path if isinstance(ref, ArtifactRef) else ref) / "manifest.json"
    config = json.loads(path.read_text()).get("config") if path.is_file() else None
    return config if isinstance(config, dict) else {}
