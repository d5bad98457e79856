"""What one stage hands the next: each file a stage writes for another stage to read is one of
these models, written by `tunepipe.tasks.core.handoff.write_handoff` and read (validated) by
`read_handoff`, so a reader never guesses at a dict's keys.

    ModelOutputs   outputs.json     sft, align, reward → align, reward, evaluate, export
    GateVerdict    verdict.json     evaluate           → deploy (its only source of the verdict)
    ExportIndex    exports.json     export             → deploy
    DeployDecision deployment.json  deploy             → operators (`tunepipe registry`, the UI)
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from tunepipe.schemas.base import StrictModel


class Handoff(StrictModel):
    """A file one stage writes into its artifact for a later stage."""

    FILE: ClassVar[str]


class ModelOutputs(Handoff):
    """A training stage's model(s): where each run's adapter or model lies in the artifact."""

    FILE: ClassVar[str] = "outputs.json"

    kind: Literal["adapter", "adapters", "model"] = Field(
        description="adapter: one shared PEFT adapter; adapters: one per task (runs are task names); model: full weights."
    )
    method: str = Field(description="The training method (sft.method.name, align.method.name, reward.method.name).")
    base_model: str | None = Field(description="The base the adapters load onto; None for a self-contained model.")
    paths: dict[str, str] = Field(description="Run name → directory relative to the artifact.")
    sft_method: str | None = Field(default=None, description="align only: the SFT method the aligned adapters continue.")


class GateVerdict(Handoff):
    """The promotion gate's decision and the evidence it used."""

    FILE: ClassVar[str] = "verdict.json"

    passed: bool = Field(description="Whether the candidate may be promoted.")
    reasons: list[str] = Field(default_factory=list, description="One line per gate rule: what was measured against what.")
    candidate: str | None = Field(default=None, description="What was evaluated (align, sft, or a path).")
    winner: Literal["align", "sft"] | None = Field(
        default=None,
        description="The pipeline artifact that should ship: the candidate when it passed; the sft adapters when the aligned "
        "candidate was held back and sft passed the same gate against the base; None when nothing passed (or the candidate "
        "is a path, not a pipeline artifact). Export (`source: auto`) exports it and deploy promotes only it.",
    )
    winner_key: str | None = Field(default=None, description="The winner's artifact key.")
    winner_reason: str = Field(default="", description="Why that (or nothing) ships, in one sentence.")
    fallback_reasons: list[str] = Field(
        default_factory=list, description="The gate's lines for sft against the base, when the aligned candidate was held back."
    )


class ExportSource(StrictModel):
    stage: str = Field(description="The exported model's stage (sft or align).")
    key: str = Field(description="Its artifact key.")


class ExportIndex(Handoff):
    """What the export stage wrote, and where."""

    FILE: ClassVar[str] = "exports.json"

    source: ExportSource = Field(description="The model artifact that was exported.")
    kind: Literal["adapter", "adapters", "model"] = Field(description="The source's kind (see ModelOutputs.kind).")
    method: str = Field(description="The source's training method.")
    base_model: str | None = Field(description="The base the adapters load onto.")
    data_key: str | None = Field(default=None, description="Key of the data artifact the model was trained and checked on.")
    runs: list[str] = Field(description="Run names (tasks, for per-task adapters).")
    targets: dict[str, dict[str, str]] = Field(description="Export target → run → directory relative to the artifact.")
    engine: str = Field(description="The serving engine the adapters were checked against.")
    max_lora_rank: int = Field(description="The largest LoRA rank that engine is configured for.")


class DeployDecision(Handoff):
    """What the deploy stage decided and did."""

    FILE: ClassVar[str] = "deployment.json"

    decision: Literal["promoted", "not_promoted"] = Field(description="Whether the alias was moved.")
    gate_passed: bool = Field(description="The gate verdict deploy acted on.")
    gate_reasons: list[str] = Field(default_factory=list, description="Its reasons (first: evaluate's winner and why, when it named one).")
    source: str | None = Field(default=None, description="The exported artifact (`stage:key`) this decision is about.")
    alias: str = Field(description="The alias that was (or would have been) moved.")
    registry: str = Field(description="The adapter registry's root.")
    server: str | None = Field(default=None, description="The server hot-loaded, if any.")
    names: list[str] = Field(description="Registry names of the exported adapters.")
    serving: dict[str, Any] = Field(default_factory=dict, description="Name → {version, path} the alias points at now.")
    registered: dict[str, int] = Field(default_factory=dict, description="Name → the version registered for this export.")
    previous: dict[str, int | None] = Field(default_factory=dict, description="Name → the version the alias pointed at before.")
    smoke: dict[str, Any] = Field(default_factory=dict, description="Name → the smoke test's answer and latency.")
    hot_loaded: bool = Field(default=False, description="Whether the adapters were hot-loaded into a running server.")
