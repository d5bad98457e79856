"""What one stage hands the next: each file a stage writes for another stage to read is one of
these models, written by `tunepipe.tasks.core.handoff.write_handoff` and read (validated) by
`read_handoff`, so a reader never guesses at a dict's keys.

    ModelOutputs   outputs.json     sft, align, reward → align, reward, evaluate, export
    GateVerdict    verdict.json     evaluate           → deploy (its only source of the verdict)
    ExportIndex    exports.json     export             → deploy
    DeployDecision deployment.json  deploy             → operators (`tunepipe registry`, the UI)

An upstream stage's config is read from its manifest (`manifest.json`'s `config`, read by
`tunepipe.tasks.core.handoff.read_manifest_config`) as one of the `KeyedConfig` views below:

    SFTKeyedConfig      sft       → align (the SFT method), evaluate and export (tasks, system prompt, training)
    AlignKeyedConfig    align     → evaluate (tasks, task tolerance) and export (training)
    PretrainKeyedConfig pretrain  → the general-knowledge check (was the model configured, or the input's)
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from tunepipe.schemas.base import StrictModel
from tunepipe.schemas.methods import MethodConfig
from tunepipe.schemas.training import TrainingConfig


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


# --------------------------------------------------------------------------------------------
# An upstream stage's config, as its key saw it

# What a model contributes to a key (tasks/lm/modeling.py model_fingerprint): the digest of a local
# directory's files, of a GGUF file's bytes, or a hub id at its revision. Never a local path: the
# key replaced the path, so the manifest (same key, same bytes) holds none.
ModelFingerprint = Annotated[str, StringConstraints(pattern=r"^(sha256:[0-9a-f]{64}|gguf:sha256:[0-9a-f]{64}|hub:.+@.+)$")]


class KeyedConfig(BaseModel):
    """An upstream stage's config as its manifest records it: the payload its key was computed from,
    which is the stage's config with some fields rewritten (a model path became its fingerprint).

    Each view declares the fields its readers use, typed as what the payload holds; a field the key
    rewrote has the name of what it now is (`base_model_fingerprint`, read from `model`). The rest
    of the payload is the stage's business (ignored, not guessed at). Every declared field is
    required: the payload is the whole config, so a missing one is an older or another stage's
    manifest, and the reader fails naming the artifact."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    STAGES: ClassVar[tuple[str, ...]]  # the stages whose manifests this view reads


class SFTKeyedConfig(KeyedConfig):
    """The sft stage's config (schemas/sft.py SFTConfig) as its key saw it."""

    STAGES: ClassVar[tuple[str, ...]] = ("sft",)

    base_model_fingerprint: ModelFingerprint | None = Field(
        alias="model", description="`sft.model` by content (None: the model was the pretrain or base_model input)."
    )
    method: MethodConfig = Field(description="The SFT method (align continues it: 4-bit loading for qlora).")
    tasks: list[str] | None = Field(description="The tasks trained on; None: every task of the train split.")
    system_prompt: str | None = Field(description="The system message sft prepended to records that had none.")
    training: TrainingConfig = Field(description="Its optimisation hyper-parameters.")


class AlignKeyedConfig(KeyedConfig):
    """The align stage's config (schemas/align.py AlignConfig) as its key saw it."""

    STAGES: ClassVar[tuple[str, ...]] = ("align",)
    # align adds no system message: it trains on the data's messages as they are (tasks/lm/pairs.py
    # prompt_records), so a reader that asks an aligned model's system prompt gets None.
    system_prompt: ClassVar[None] = None

    tasks: list[str] | None = Field(description="The tasks aligned; None: every task.")
    task_tolerance: float = Field(description="The largest task-metric drop from SFT the run was held to.")
    training: TrainingConfig = Field(description="Its optimisation hyper-parameters.")


class PretrainKeyedConfig(KeyedConfig):
    """The pretrain stage's config (schemas/pretrain.py PretrainConfig) as its key saw it."""

    STAGES: ClassVar[tuple[str, ...]] = ("pretrain",)

    base_model_fingerprint: ModelFingerprint | None = Field(
        alias="model", description="`pretrain.model` by content (None: it continued the base_model input)."
    )
