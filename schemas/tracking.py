"""The `tracking:` section: where the training curves and the stages' headline metrics go.

Tracking is not part of what an artifact is: none of these fields enters a stage key, and a
stage publishes the same bytes whatever the backend.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from tunepipe.schemas.base import StrictModel
from tunepipe.schemas.secret_refs import check_literal, mask_credentials


class TensorBoardSettings(StrictModel):
    """TensorBoard event files, written by the trainers' own `TensorBoardCallback`."""

    log_dir: str | None = Field(
        default=None,
        description="Directory of the event files (one sub-directory per pipeline/stage/task run); "
        "default `<workdir>/tracking/tensorboard`. View with `tensorboard --logdir DIR`.",
    )


class MLflowSettings(StrictModel):
    """MLflow tracking (and, for exports, its model registry), through the trainers' `MLflowCallback`."""

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; default a local SQLite store `sqlite:///<workdir>/tracking/mlflow.db` "
        "(nothing to start). A credential in it is a `${NAME}` reference; MLflow's own MLFLOW_TRACKING_USERNAME/"
        "MLFLOW_TRACKING_PASSWORD/MLFLOW_TRACKING_TOKEN environment variables work as usual.",
    )
    experiment: str | None = Field(default=None, description="Experiment name; default the pipeline's name.")
    register_models: bool = Field(
        default=True, description="Register each exported model/adapter in MLflow's model registry (as `<pipeline>-<name>`)."
    )
    server_port: int = Field(
        default=5000, ge=1, le=65535, description="Port of the `mlflow server` that `tunepipe up --mlflow` starts beside Prefect."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _no_literal_password(cls, value: str | None) -> str | None:
        if value and mask_credentials(value) != value:  # user:password@ or a token in the query
            check_literal(value, "tracking.mlflow.tracking_uri")
        return value


class WandbSettings(StrictModel):
    """Weights & Biases, through the trainers' `WandbCallback` (the `wandb` extra)."""

    project: str | None = Field(default=None, description="W&B project; default the pipeline's name.")
    entity: str | None = Field(default=None, description="W&B entity (user or team); default the account's.")
    mode: Literal["online", "offline", "disabled"] = Field(
        default="offline",
        description="offline writes runs under `dir` for a later `wandb sync`; online needs `api_key`.",
    )
    api_key: str | None = Field(
        default=None, description="The W&B API key, as a `${NAME}` reference (e.g. `${WANDB_API_KEY}`); never a literal."
    )
    dir: str | None = Field(default=None, description="Where W&B writes its run files; default `<workdir>/tracking`.")

    @field_validator("api_key")
    @classmethod
    def _reference_only(cls, value: str | None) -> str | None:
        return check_literal(value, "tracking.wandb.api_key") if value else value


class TrackingConfig(StrictModel):
    """Experiment tracking: one run per stage (and per training task), named `pipeline/stage/task`,
    tagged with the stage key and its input keys; a cached stage logs nothing new."""

    backend: Literal["tensorboard", "mlflow", "wandb", "none"] = Field(
        default="tensorboard",
        description="tensorboard: event files under the workdir (nothing to start); mlflow: an MLflow tracking "
        "store (local SQLite by default) with nested runs and the model registry; wandb: Weights & Biases "
        "(offline by default); none: no tracking.",
    )
    tensorboard: TensorBoardSettings = Field(default_factory=TensorBoardSettings, description="TensorBoard settings.")
    mlflow: MLflowSettings = Field(default_factory=MLflowSettings, description="MLflow settings.")
    wandb: WandbSettings = Field(default_factory=WandbSettings, description="Weights & Biases settings.")

    @model_validator(mode="after")
    def _backend_installed(self) -> "TrackingConfig":
        import importlib.util

        package = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}.get(self.backend)
        if package and importlib.util.find_spec(package) is None:
            extra = f"tunepipe[{package}]" if package != "tensorboard" else "tensorboard"
            raise ValueError(f"tracking.backend {self.backend} needs the {package} package: pip install '{extra}'")
        return self
