"""The pipeline YAML: top-level keys and one section per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.base import StrictModel, resolve_path
from tunepipe.schemas.base_model import BaseModelConfig
from tunepipe.schemas.data import DataConfig
from tunepipe.schemas.deploy import DeployConfig
from tunepipe.schemas.evaluate import EvaluateConfig
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.graph import STAGE_GRAPH, STAGE_ORDER
from tunepipe.schemas.operations import (
    DeploymentConfig,
    NotificationsConfig,
    ScheduleConfig,
    WatchConfig,
)
from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.schemas.scoring import ScoringConfig
from tunepipe.schemas.serve import ServeConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.schemas.tracking import TrackingConfig


SCORING_STAGES = ("sft", "align", "evaluate", "export")


class PipelineConfig(StrictModel):
    """A whole pipeline: where it works, on what hardware, and each stage's settings."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Pipeline name; names Prefect runs and deployments.")
    workdir: str = Field(description="Directory for artifacts, Prefect state and logs (relative to this YAML).")
    environment: str = Field(
        default="cpu",
        description="Hardware profile: a bundled name (see environments/) or a path to a profile YAML.",
    )
    seed: int = Field(
        default=42,
        description="Global seed. When given, every stage seed left unset (data split salt, MinHash and mix sampling, "
        "training, base-model initialisation, evaluation bootstrap) takes this value, so one line reseeds the "
        "pipeline (and changes every key); a seed set in a stage's section wins. Unset: each stage's own default.",
    )
    scoring: ScoringConfig | None = Field(
        default=None,
        description="How answers are scored against references (normalisation, classification labels per task), for "
        "every stage that scores them: sft's and align's held-out checks, evaluate, export's re-evaluation. A stage's "
        "own `scoring:` overrides it. Default: SQuAD normalisation for every task, no labels.",
    )
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
    reward: RewardConfig | None = Field(
        default=None, description="A reward model trained on the preference pairs (TRL RewardTrainer), LoRA or full."
    )
    align: AlignConfig | None = Field(
        default=None,
        description="Alignment of the SFT policy: DPO (and its loss variants), KTO, ORPO, PPO, GRPO or RLOO, "
        "on dataset or on-policy preference pairs.",
    )
    evaluate: EvaluateConfig | None = Field(
        default=None,
        description="Candidate vs baseline on the test split: task metrics, lm-eval, forgetting check, A/B with "
        "bootstrap intervals, and the promotion gate (gate_passed) that deploy obeys.",
    )
    export: ExportConfig | None = Field(
        default=None,
        description="Serving artifacts from the sft/align artifact: adapters checked for the serving engine, a merged "
        "model, bnb/GPTQ/AWQ quantized models re-evaluated on the test split, a model card.",
    )
    deploy: DeployConfig | None = Field(
        default=None,
        description="Register the exported adapters, point the serving alias at them, hot-load them into the running "
        "server and smoke-test them; only on a passed gate; rolls back on failure.",
    )
    serve: ServeConfig | None = Field(
        default=None,
        description="`tunepipe serve`: the multi-LoRA OpenAI-compatible server (engine, adapters, limits, A/B router). "
        "Read by `tunepipe serve`, not a pipeline stage.",
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
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="Experiment tracking of training curves and stage metrics: TensorBoard (default, under the workdir), "
        "MLflow or W&B. Not part of any stage key.",
    )
    deployment: DeploymentConfig = Field(
        default_factory=DeploymentConfig, description="Work pools and concurrency of the deployed pipeline (`tunepipe deploy`)."
    )

    @model_validator(mode="before")
    @classmethod
    def _shared_scoring(cls, data: Any) -> Any:
        # One scoring section for every stage that scores answers, so sft, align, evaluate and export
        # report the same figure for the same answers; a stage's own section wins.
        if not isinstance(data, dict) or data.get("scoring") is None:
            return data
        out = dict(data)
        for stage in SCORING_STAGES:
            section = out.get(stage)
            if isinstance(section, dict) and "scoring" not in section:
                out[stage] = {**section, "scoring": data["scoring"]}
        return out

    @model_validator(mode="before")
    @classmethod
    def _serving_baseline_defaults(cls, data: Any) -> Any:
        # `evaluate.baseline: serving` reads the registry deploy writes: same root, same name. Filled
        # in only for that baseline, since these fields enter the evaluate stage's key.
        evaluate, deploy = (data.get("evaluate"), data.get("deploy")) if isinstance(data, dict) else (None, None)
        if not isinstance(evaluate, dict) or evaluate.get("baseline") != "serving":
            return data
        deploy = deploy if isinstance(deploy, dict) else {}
        evaluate = dict(evaluate)
        if evaluate.get("registry") is None and "workdir" in data:
            evaluate["registry"] = deploy.get("registry") or str(Path(str(data["workdir"])) / "registry")
        if evaluate.get("registry_name") is None and deploy.get("name"):
            evaluate["registry_name"] = deploy["name"]
        return {**data, "evaluate": evaluate}

    @model_validator(mode="after")
    def _global_seed(self) -> "PipelineConfig":
        # Only a seed the user wrote reseeds: the stages' own defaults (0 for the split salt and the
        # bootstrap, 42 elsewhere) stay what they were for configs that never mention `seed`.
        if "seed" in self.model_fields_set:
            for name in STAGE_ORDER:
                _seed_unset(getattr(self, name, None), self.seed)
        return self

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
    def _stages_have_their_inputs(self) -> "PipelineConfig":
        for stage, node in STAGE_GRAPH.items():
            if getattr(self, stage) is not None:
                missing = [name for name in node.required if getattr(self, name) is None]
                if missing:
                    raise ValueError(f"{stage} needs the {', '.join(missing)} stage: add a `{missing[0]}:` section")
        if self.align is not None and self.align.needs_reward_model() and self.reward is None:
            raise ValueError(f"align.method {self.align.method.name} scores with the reward model: add a `reward:` section")
        if self.evaluate is not None:
            if self.evaluate.candidate == "align" and self.align is None:
                raise ValueError("evaluate.candidate is align but the pipeline has no `align:` section")
            if self.evaluate.ab.judge == "reward_model" and self.reward is None:
                raise ValueError("evaluate.ab.judge is reward_model but the pipeline has no `reward:` section")
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


def _seed_unset(node: Any, seed: int) -> None:
    """Set every `seed` field below `node` that its YAML left unset to `seed`."""
    if isinstance(node, (list, tuple)):
        for item in node:
            _seed_unset(item, seed)
        return
    if not isinstance(node, StrictModel):
        return
    for name, field in type(node).model_fields.items():
        value = getattr(node, name)
        if name == "seed" and name not in node.model_fields_set and (value is None or isinstance(value, int)) and field.annotation is not bool:
            setattr(node, name, seed)
        else:
            _seed_unset(value, seed)
