"""What a published artifact says about itself, and how stages refer to each other."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ArtifactRef(BaseModel):
    """A published artifact: `<workdir>/artifacts/<stage>/<key>/`."""

    stage: str = Field(description="Stage that produced the artifact.")
    key: str = Field(description="Content key: hash of config, input keys and code version.")
    path: str = Field(description="Absolute path of the published artifact directory.")
    cached: bool = Field(default=False, description="True when this run reused the artifact.")


class FileEntry(BaseModel):
    path: str = Field(description="Path relative to the artifact directory.")
    sha256: str = Field(description="sha256 of the file's bytes.")
    size: int = Field(description="Size in bytes.")


class Timings(BaseModel):
    started_at: str = Field(description="UTC ISO time the stage started computing.")
    finished_at: str = Field(description="UTC ISO time the stage finished computing.")
    seconds: float = Field(description="Wall seconds spent computing.")


class Manifest(BaseModel):
    """`manifest.json`: everything needed to trust, trace and reproduce an artifact."""

    stage: str = Field(description="Stage name.")
    key: str = Field(description="Cache key (see tasks.core.fingerprint.stage_key).")
    code_version: str = Field(description="Hash of the normalised source of the stage's import closure and its libraries' versions.")
    config: Any = Field(description="The config payload that entered the key.")
    environment: dict[str, Any] = Field(default_factory=dict, description="Profile fields that entered the key.")
    inputs: dict[str, dict[str, str]] = Field(default_factory=dict, description="Input name → {stage, key}.")
    libraries: dict[str, str] = Field(
        default_factory=dict, description="Versions of the third-party distributions the stage's code imports (part of its key)."
    )
    metrics: dict[str, Any] = Field(default_factory=dict, description="Stage metrics.")
    files: list[FileEntry] = Field(default_factory=list, description="Every file in the artifact but this manifest.")
    timings: Timings = Field(description="When and how long the stage computed.")
