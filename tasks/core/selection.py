"""Which stages a run includes (`--until`) and which it recomputes (`--from`)."""

from __future__ import annotations

from pydantic import Field, model_validator
from tunepipe.schemas.base import StrictModel
from tunepipe.schemas.graph import STAGE_ORDER


class StageSelection(StrictModel):
    """A run's selection of the configured stages."""

    stages: list[str] = Field(description="Configured stages, in pipeline order.")
    until: str | None = Field(default=None, description="Last stage to run; later stages are left out.")
    from_stage: str | None = Field(
        default=None,
        description="First stage to recompute even when cached; earlier stages come from the cache (or run if missing).",
    )

    @model_validator(mode="after")
    def _known(self) -> "StageSelection":
        for flag, name in (("--until", self.until), ("--from", self.from_stage)):
            if name is not None and name not in self.stages:
                raise ValueError(f"{flag} {name}: not a configured stage ({', '.join(self.stages)})")
        if self.until and self.from_stage and self._index(self.from_stage) > self._index(self.until):
            raise ValueError(f"--from {self.from_stage} comes after --until {self.until}")
        return self

    def _index(self, name: str) -> int:
        return STAGE_ORDER.index(name)

    def includes(self, name: str) -> bool:
        if name not in self.stages:
            return False
        return self.until is None or self._index(name) <= self._index(self.until)

    def refresh(self, name: str) -> bool:
        return self.from_stage is not None and self._index(name) >= self._index(self.from_stage)
