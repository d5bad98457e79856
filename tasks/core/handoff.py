"""Writing and reading the files one stage hands the next (`schemas/handoffs.py`): the one
writer and the one reader of each, validated on both sides; and the one reader of an upstream
stage's config (its manifest's key payload, as a typed view)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError
from tunepipe.schemas.handoffs import Handoff, KeyedConfig
from tunepipe.schemas.manifest import ArtifactRef, Manifest
from tunepipe.tasks.core.artifacts import MANIFEST
from tunepipe.tasks.core.stage import StageFailed

H = TypeVar("H", bound=Handoff)
K = TypeVar("K", bound=KeyedConfig)


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


def read_manifest_config(ref: ArtifactRef | str | Path, views: type[K] | tuple[type[K], ...], *, reader: str) -> K:
    """The config an upstream artifact was made with, as the `views` model for its stage (a
    `KeyedConfig` of schemas/handoffs.py: the payload its key was computed from, typed). A missing
    manifest, another stage's, or a payload without a field the view needs (an older tunepipe's)
    fails the reading stage with a message that names the artifact and what was expected."""
    root = Path(ref.path if isinstance(ref, ArtifactRef) else ref)
    path = root / MANIFEST
    wanted = views if isinstance(views, tuple) else (views,)
    expected = " or ".join(stage for view in wanted for stage in view.STAGES)
    if not path.is_file():
        raise StageFailed(f"{reader}: {path} is missing: {root} is not a published {expected} artifact")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise StageFailed(f"{reader}: {path} is not a valid manifest: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    view = next((v for v in wanted if manifest.stage in v.STAGES), None)
    if view is None:
        raise StageFailed(f"{reader}: {root} was made by the {manifest.stage} stage, not by {expected}")
    try:
        return view.model_validate(manifest.config)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "config"
        raise StageFailed(
            f"{reader}: the config in {path} is not what this tunepipe's {manifest.stage} stage records ({field}: {error['msg']}): "
            f"re-run {manifest.stage} with this version"
        ) from None
