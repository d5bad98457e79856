"""Records of the adapter registry (`tasks/core/registry.py`): what `index.json` holds.

Not a pipeline section: these are the registry's own records, validated on every read so a
hand-edited or truncated index fails loudly instead of serving the wrong adapter.
"""

from __future__ import annotations

from pydantic import Field
from tunepipe.schemas.base import StrictModel

NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]*$"  # no '@' (the version/alias separator), never all digits


class Lineage(StrictModel):
    """Where a registered adapter came from."""

    run: str | None = Field(default=None, description="Training run inside the source artifact (`all`, or the task of a per-task adapter).")
    data_key: str | None = Field(default=None, description="Key of the data artifact it was trained on (the data version).")
    base_model: str | None = Field(default=None, description="Base model the adapter applies to (path or hub id).")
    method: str | None = Field(default=None, description="Fine-tuning method (lora, qlora, ...).")
    source: str | None = Field(default=None, description="`stage:key` of the training artifact (sft or align).")
    export_key: str | None = Field(default=None, description="Key of the export artifact the adapter was registered from.")
    pipeline_run: str | None = Field(default=None, description="Artifact key of the deploy decision that registered it.")


class AdapterVersion(StrictModel):
    """One registered version of a named adapter."""

    name: str = Field(pattern=NAME_PATTERN, description="Adapter name.")
    version: int = Field(ge=1, description="Version number, 1, 2, ... per name.")
    location: str = Field(description="Directory of the copied adapter, relative to the registry root.")
    path: str = Field(default="", description="Full location (local path or URI), recomputed from the root on every read.")
    digest: str = Field(description="sha256 of the adapter's files: registering identical content returns this version.")
    base_model: str | None = Field(default=None, description="Base model the adapter applies to.")
    lineage: Lineage = Field(default_factory=Lineage, description="Where the adapter came from.")
    registered_at: str = Field(description="UTC ISO time of registration.")


class AdapterRecord(StrictModel):
    """A named adapter: its versions and aliases."""

    versions: list[AdapterVersion] = Field(default_factory=list, description="Every version, oldest first.")
    aliases: dict[str, int] = Field(default_factory=dict, description="Alias → the version it points at now.")
    alias_history: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Alias → versions it pointed at, oldest first, the current one last; rollback pops the last.",
    )


class RegistryEvent(StrictModel):
    """One change to the registry (the audit log)."""

    at: str = Field(description="UTC ISO time.")
    action: str = Field(description="register | promote | rollback | set_alias | unset_alias.")
    name: str = Field(description="Adapter name.")
    version: int | None = Field(default=None, description="Version registered, or the version the alias points at afterwards.")
    alias: str | None = Field(default=None, description="Alias changed (promote, rollback, set_alias).")
    previous: int | None = Field(default=None, description="Version the alias pointed at before.")
    reason: str | None = Field(default=None, description="Why (e.g. the failed smoke test of a rollback).")


class RegistryIndex(StrictModel):
    """The whole registry state: `index.json`."""

    format: int = Field(default=1, description="Index format version.")
    adapters: dict[str, AdapterRecord] = Field(default_factory=dict, description="Name → record.")
    events: list[RegistryEvent] = Field(default_factory=list, description="Every change, oldest first.")
