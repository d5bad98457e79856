"""The pipeline YAML: top-level keys and one section per stage."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator

from schemas.base import StrictModel, resolve_path
from schemas.base_model import BaseModelConfig
from schemas.data import DataConfig
from schemas.pretrain import PretrainConfig
from schemas.sft import SFTConfig
from schemas.operations import DeploymentConfig, NotificationsConfig, ScheduleConfig, WatchConfig

# Stage order: a stage may only read artifacts of stages before it.
STAGE_ORDER: tuple[str, ...] = ("data", "base_model", "pretrain", "sft")


class PipelineConfig(StrictModel):
    """A whole pipeline: where it works, on what hardware, and each stage's settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Pipeline name; names Prefect runs and deployments.")
    workdir: str = Field(description="Directory for artifacts, Prefect state and logs (relative to this YAML).")
    environment: str = Field(
        default="cpu",
        description="Hardware profile: a bundled name (see environments/) or a path to a profile YAML.",
    )
    seed: int = Field(default=42, description="Global seed; stages derive theirs from it unless they set one.")
    data: DataConfig = Field(description="The `data` stage: sources → cleaned, deduplicated, validated instruction JSON.")
    base_model: BaseModelConfig | None = Field(
        default=None,
        description="Build a small base model locally (tokenizer trained on the corpus + a Llama from a config). "
        "Omit when training starts from a hub id or local model.",
    )
    pretrain: PretrainConfig | None = Field(
        default=None, description="Continued pretraining on the data stage's corpus (optional): injects domain text."
    )
    sft: SFTConfig | None = Field(
        default=None, description="Instruction SFT on the data stage's splits: full, freeze, LoRA, QLoRA and other PEFT methods."
    )
    schedule: ScheduleConfig | None = Field(
        default=None, description="Run the deployed pipeline on a cron line or interval (`tunepipe deploy`)."
    )
    watch: WatchConfig | None = Field(
        default=None,
        description="Data drops: new inbox files become a data version that triggers a retraining run (`tunepipe watch`).",
    )
    notifications: NotificationsConfig | None = Field(
        default=None, description="POST a JSON notification to a webhook on failure, completion or a gate verdict."
    )
    deployment: DeploymentConfig = Field(
        default_factory=DeploymentConfig, description="Work pools and concurrency of the deployed pipeline (`tunepipe deploy`)."
    )

    @field_validator("workdir")
    @classmethod
    def _resolve_workdir(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)

    @field_validator("environment")
    @classmethod
    def _resolve_environment(cls, value: str, info: ValidationInfo) -> str:
        # Bundled profiles are plain names; anything that looks like a file resolves like a path.
        return resolve_path(value, info) if value.endswith((".yaml", ".yml")) else value

    @model_validator(mode="after")
    def _training_has_a_model(self) -> "PipelineConfig":
        for name in ("pretrain", "sft"):
            section = getattr(self, name)
            upstream = self.base_model is not None or (name == "sft" and self.pretrain is not None)
            if section is not None and section.model is None and not upstream:
                raise ValueError(f"{name}.model is not set and the pipeline builds no base model: set {name}.model to a hub id or local path")
        return self

    @model_validator(mode="after")
    def _routed_stages_exist(self) -> "PipelineConfig":
        unknown = sorted(set(self.deployment.stage_environments) - set(self.stages()))
        if unknown:
            raise ValueError(f"deployment.stage_environments names stages this pipeline does not have: {unknown}")
        return self

    def stages(self) -> list[str]:
        """The configured stages, in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self, name) is not None]
