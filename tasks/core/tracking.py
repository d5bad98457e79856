"""Experiment tracking around a stage that runs (never around a cached one).

The training curves reach the backend through the trainers' own integrations (`report_to`:
transformers' TensorBoardCallback, MLflowCallback, WandbCallback); this module only names the
run, tags it and points the integration at it, through the environment variables those
callbacks read. The variables are set while one training job runs, so launched workers
(accelerate, torchrun) inherit them. After the stage, its headline metrics, gate verdict and
plots are logged to a stage-level run. None of this touches the staging directory: tracking
is not part of what an artifact is, and a cached stage logs nothing.

Each stage that ran leaves a small record `<workdir>/tracking/runs/<stage>/<key>.json` naming
its tracked runs, so a later pipeline run that reuses the artifact links to the run that made it.

Run names are `pipeline/stage` and `pipeline/stage/task`; tags: `tunepipe.stage`, `tunepipe.key`,
`tunepipe.input.<name>` (the input artifacts' keys), `tunepipe.pipeline_run`. With MLflow, one
parent run per pipeline run (created when its first stage runs), the stage runs nested in it
and the training tasks' runs nested in their stage's run.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tunepipe.schemas.tracking import TrackingConfig
from tunepipe.tasks.core.secrets import redact, resolve

log = logging.getLogger("tunepipe.tracking")

# Read by `training_arguments` (in this process or a launched worker): the trainer's `report_to`
# and `run_name`. Unset: no tracking (`report_to: none`), as for a job run outside a pipeline.
REPORT_TO_ENV = "TUNEPIPE_TRACKING_REPORT_TO"
RUN_NAME_ENV = "TUNEPIPE_TRACKING_RUN_NAME"
MLFLOW_RUN_ENV = "TUNEPIPE_TRACKING_MLFLOW_RUN"

_parents: dict[str, str] = {}  # pipeline run id -> its MLflow parent run id
_parents_lock = threading.Lock()


@dataclass(frozen=True)
class TrackingSession:
    """What the stage tasks of one pipeline run need to track: settings, pipeline, workdir, run id."""

    settings: TrackingConfig
    pipeline: str
    workdir: str
    run_id: str

    @property
    def enabled(self) -> bool:
        return self.settings.backend != "none"

    def tracking_dir(self) -> Path:
        return Path(self.workdir) / "tracking"

    def tensorboard_dir(self) -> Path:
        return Path(self.settings.tensorboard.log_dir or self.tracking_dir() / "tensorboard")

    def mlflow_uri(self) -> str:
        uri = self.settings.mlflow.tracking_uri
        if uri:
            return resolve(uri, "tracking.mlflow.tracking_uri")
        return f"sqlite:///{(self.tracking_dir() / 'mlflow.db').resolve()}"

    def mlflow_experiment(self) -> str:
        return self.settings.mlflow.experiment or self.pipeline

    def wandb_dir(self) -> Path:
        return Path(self.settings.wandb.dir or self.tracking_dir())


@dataclass
class StageRun:
    """One stage's tracked runs while it runs."""

    session: TrackingSession
    stage: str
    key: str
    input_keys: dict[str, str]
    mlflow_run_id: str | None = None
    runs: dict[str, Any] = field(default_factory=dict)  # what the record file lists: task -> run id / log dir

    @property
    def name(self) -> str:
        return f"{self.session.pipeline}/{self.stage}"

    def tags(self) -> dict[str, str]:
        return {
            "tunepipe.pipeline": self.session.pipeline,
            "tunepipe.pipeline_run": self.session.run_id,
            "tunepipe.stage": self.stage,
            "tunepipe.key": self.key,
            **{f"tunepipe.input.{name}": key for name, key in self.input_keys.items()},
        }

    def tensorboard_dir(self, task: str | None = None) -> Path:
        # pipeline/stage/<key prefix>[/task]: runs of one stage with other keys sit side by side.
        base = self.session.tensorboard_dir() / self.session.pipeline / self.stage / self.key[:12]
        return base / task if task else base


_current: contextvars.ContextVar[StageRun | None] = contextvars.ContextVar("tunepipe_stage_run", default=None)
_stage_name: contextvars.ContextVar[str | None] = contextvars.ContextVar("tunepipe_stage_name", default=None)


def current_stage_run() -> StageRun | None:
    return _current.get()


# -- MLflow ------------------------------------------------------------------------------------


def _mlflow_client(session: TrackingSession) -> tuple[Any, str]:
    """An MlflowClient on the session's store and the experiment id (created when missing; a local
    store keeps its artifacts under the workdir)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=session.mlflow_uri())
    name = session.mlflow_experiment()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return client, experiment.experiment_id
    location = None
    if session.settings.mlflow.tracking_uri is None:
        location = (session.tracking_dir() / "mlflow-artifacts").resolve().as_uri()
    return client, client.create_experiment(name, artifact_location=location)


def _mlflow_parent(session: TrackingSession, client: Any, experiment_id: str) -> str:
    """The pipeline run's MLflow parent run, created by the first stage that runs."""
    with _parents_lock:
        if session.run_id not in _parents:
            run = client.create_run(
                experiment_id, run_name=f"{session.pipeline}/run-{session.run_id[:8]}",
                tags={"tunepipe.pipeline": session.pipeline, "tunepipe.pipeline_run": session.run_id},
            )
            _parents[session.run_id] = run.info.run_id
        return _parents[session.run_id]


def finish_pipeline_run(session: TrackingSession, failed: bool = False) -> None:
    """End the pipeline run's MLflow parent run, if a stage created one."""
    with _parents_lock:
        parent = _parents.pop(session.run_id, None)
    if parent is not None:
        client, _ = _mlflow_client(session)
        client.set_terminated(parent, status="FAILED" if failed else "FINISHED")


# -- a stage that runs -------------------------------------------------------------------------


@contextlib.contextmanager
def tracked_stage(session: TrackingSession | None, stage: str, key: str, input_keys: dict[str, str]) -> Iterator[StageRun | None]:
    """Around `stage.run`: the stage's run exists while its training jobs run (their parent)."""
    named = _stage_name.set(stage)
    try:
        if session is None or not session.enabled:
            yield None
            return
        with _tracked_stage(session, stage, key, input_keys) as run:
            yield run
    finally:
        _stage_name.reset(named)


def current_stage_name() -> str | None:
    """The stage `run_stage` is running in this context (tracked or not)."""
    return _stage_name.get()


@contextlib.contextmanager
def _tracked_stage(session: TrackingSession, stage: str, key: str, input_keys: dict[str, str]) -> Iterator[StageRun]:
    run = StageRun(session, stage, key, input_keys)
    if session.settings.backend == "mlflow":
        client, experiment_id = _mlflow_client(session)
        parent = _mlflow_parent(session, client, experiment_id)
        created = client.create_run(experiment_id, run_name=run.name, tags={"mlflow.parentRunId": parent, **run.tags()})
        run.mlflow_run_id = created.info.run_id
        run.runs["stage"] = run.mlflow_run_id
    token = _current.set(run)
    try:
        yield run
    except BaseException:
        if run.mlflow_run_id:
            _mlflow_client(session)[0].set_terminated(run.mlflow_run_id, status="FAILED")
        raise
    finally:
        _current.reset(token)


def log_stage_results(
    run: StageRun | None, metrics: dict[str, Any], artifact_dir: Path, *, plots: list[Path] | None = None,
    models: dict[str, Path] | None = None,
) -> None:
    """The stage's headline metrics (numbers, flattened `a/b`), its gate verdict and its plots, to the
    stage's run; then the record of its tracked runs. A failure here is logged, never fatal: the
    artifact is already computed and tracking is not part of it."""
    if run is None:
        return
    scalars = headline_scalars(metrics)
    images = plots if plots is not None else sorted(artifact_dir.glob("*.png"))
    try:
        backend = run.session.settings.backend
        if backend == "tensorboard":
            _tensorboard_stage(run, scalars, images)
        elif backend == "mlflow":
            _mlflow_stage(run, scalars, images, models or {})
        elif backend == "wandb":
            _wandb_stage(run, scalars, images)
        write_record(run)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("tracking (%s) of %s failed: %s", run.session.settings.backend, run.name, exc)


def headline_scalars(metrics: dict[str, Any], prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Finite numbers (and booleans: a gate verdict is 1/0) of a stage's metrics, nested keys joined
    by `/`; lists (loss histories, per-example rows) are left out: the curves come from the trainer."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, bool):
            out[key] = 1.0 if value else 0.0
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
        elif isinstance(value, dict) and depth < 3:
            out.update(headline_scalars(value, f"{key}/", depth + 1))
    return out


def _tensorboard_stage(run: StageRun, scalars: dict[str, float], images: list[Path]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    path = run.tensorboard_dir()
    with contextlib.closing(SummaryWriter(log_dir=str(path))) as writer:
        writer.add_text("tunepipe/tags", "\n".join(f"    {k}: {v}" for k, v in run.tags().items()), 0)
        for name, value in scalars.items():
            writer.add_scalar(f"stage/{name}", value, 0)
        for image in images:
            writer.add_image(f"plots/{image.stem}", _image_array(image), 0, dataformats="HWC")
    run.runs["stage"] = str(path)


def _image_array(path: Path) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _mlflow_stage(run: StageRun, scalars: dict[str, float], images: list[Path], models: dict[str, Path]) -> None:
    from mlflow.entities import Metric

    client, _ = _mlflow_client(run.session)

    now = int(time.time() * 1000)
    metrics = [Metric(_mlflow_name(k), v, now, 0) for k, v in scalars.items()]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run.mlflow_run_id, metrics=metrics[start : start + 1000])
    for image in images:
        client.log_artifact(run.mlflow_run_id, str(image), artifact_path="plots")
    register_models(run, models)
    client.set_terminated(run.mlflow_run_id, status="FINISHED")


def _mlflow_name(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)[:250]


def _wandb_stage(run: StageRun, scalars: dict[str, float], images: list[Path]) -> None:
    import wandb

    settings = run.session.settings.wandb
    with _wandb_environment(run.session):
        started = wandb.init(
            project=settings.project or run.session.pipeline, entity=settings.entity, mode=settings.mode,
            dir=str(run.session.wandb_dir()), name=run.name, group=run.session.run_id,
            tags=_wandb_tags(run), config={"tunepipe": run.tags()}, reinit="create_new",
        )
        try:
            started.log({**{f"stage/{k}": v for k, v in scalars.items()}, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images}})
            run.runs["stage"] = started.id
        finally:
            started.finish()


def _wandb_tags(run: StageRun) -> list[str]:
    # W&B tags are short strings (at most 64 characters).
    return ["tunepipe", run.stage, f"key:{run.key[:16]}", *(f"{name}:{key[:16]}" for name, key in run.input_keys.items())]


@contextlib.contextmanager
def _wandb_environment(session: TrackingSession) -> Iterator[None]:
    values = {"WANDB_SILENT": "true", "WANDB_DIR": str(session.wandb_dir())}
    if session.settings.wandb.api_key:
        values["WANDB_API_KEY"] = resolve(session.settings.wandb.api_key, "tracking.wandb.api_key")
    session.wandb_dir().mkdir(parents=True, exist_ok=True)
    with environment(values):
        yield


# -- a training job ----------------------------------------------------------------------------


@contextlib.contextmanager
def tracked_training(task: str | None) -> Iterator[None]:
    """Around one training job of the running stage: the variables the trainer's `report_to`
    integration reads (its run name, where and under which run it logs). No stage run: nothing."""
    run = current_stage_run()
    if run is None:
        yield
        return
    session, backend = run.session, run.session.settings.backend
    label = task or "train"
    name = f"{run.name}/{label}"
    values = {REPORT_TO_ENV: backend, RUN_NAME_ENV: name}
    mlflow_run = None
    if backend == "tensorboard":
        path = run.tensorboard_dir(label)
        values["TENSORBOARD_LOGGING_DIR"] = str(path)
        run.runs[label] = str(path)
    elif backend == "mlflow":
        client, experiment_id = _mlflow_client(session)
        mlflow_run = client.create_run(
            experiment_id, run_name=name, tags={"mlflow.parentRunId": run.mlflow_run_id, **run.tags(), "tunepipe.task": label}
        ).info.run_id
        run.runs[label] = mlflow_run
        # MLflowCallback resumes this run (MLFLOW_RUN_ID) and ends it when training ends.
        values.update({
            "MLFLOW_TRACKING_URI": session.mlflow_uri(), "MLFLOW_EXPERIMENT_NAME": session.mlflow_experiment(),
            "MLFLOW_RUN_ID": mlflow_run, MLFLOW_RUN_ENV: mlflow_run, "MLFLOW_FLATTEN_PARAMS": "1",
        })
    elif backend == "wandb":
        settings = session.settings.wandb
        values.update({
            "WANDB_PROJECT": settings.project or session.pipeline, "WANDB_MODE": settings.mode,
            "WANDB_RUN_GROUP": session.run_id, "WANDB_TAGS": ",".join([*_wandb_tags(run), f"task:{label}"]),
            "WANDB_LOG_MODEL": "false", "WANDB_WATCH": "false",
            **({"WANDB_ENTITY": settings.entity} if settings.entity else {}),
        })
    stack = contextlib.ExitStack()
    with stack:
        if backend == "wandb":
            stack.enter_context(_wandb_environment(session))
        stack.enter_context(environment(values))
        try:
            yield
            if mlflow_run is not None:
                _end_active_mlflow_run(mlflow_run)
                _end_if_running(session, mlflow_run)
        except BaseException:
            if mlflow_run is not None:
                _end_active_mlflow_run(mlflow_run)
                _mlflow_client(session)[0].set_terminated(mlflow_run, status="FAILED")
            raise
        finally:
            if backend == "wandb":
                _finish_wandb()


def _end_if_running(session: TrackingSession, run_id: str) -> None:
    # A trainer that never logged (no MLflowCallback setup) leaves the run open: close it.
    client, _ = _mlflow_client(session)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status="FINISHED")


def _finish_wandb() -> None:
    # WandbCallback leaves its run open after training; the next task must start its own.
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()


def tracked_run_callbacks() -> list[Any]:
    """Callbacks that keep the trainer's tracked run the target of what it logs after training.

    MLflowCallback ends its run when training ends; the evaluation that follows (`trainer.evaluate`,
    eval_loss) then logged into a new, unnamed run that MLflow's fluent API started by itself. This
    re-activates the job's run for it; `tracked_training` (or MLflow's exit hook, in a
    launched worker) ends it."""
    if os.environ.get(REPORT_TO_ENV) != "mlflow":
        return []
    from transformers import TrainerCallback

    class KeepMlflowRunActive(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            import mlflow

            run_id = os.environ.get(MLFLOW_RUN_ENV)  # MLflow's start_run pops MLFLOW_RUN_ID
            if state.is_world_process_zero and run_id and mlflow.active_run() is None:
                mlflow.start_run(run_id=run_id)

    return [KeepMlflowRunActive()]


def _end_active_mlflow_run(run_id: str) -> None:
    mlflow = sys.modules.get("mlflow")
    active = mlflow.active_run() if mlflow is not None else None
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run()


def trainer_report_to() -> dict[str, Any]:
    """`report_to` and `run_name` for TrainingArguments: the running job's backend, else none."""
    backend = os.environ.get(REPORT_TO_ENV)
    if not backend or backend == "none":
        return {"report_to": "none"}
    return {"report_to": [backend], "run_name": os.environ.get(RUN_NAME_ENV)}


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- records: the runs that made an artifact ---------------------------------------------------


def record_path(workdir: str | Path, stage: str, key: str) -> Path:
    return Path(workdir) / "tracking" / "runs" / stage / f"{key}.json"


def write_record(run: StageRun) -> None:
    path = record_path(run.session.workdir, run.stage, run.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"backend": run.session.settings.backend, "name": run.name, "pipeline_run": run.session.run_id, "runs": run.runs}
    if run.session.settings.backend == "mlflow":
        record["tracking_uri"] = _redacted(run.session.mlflow_uri())
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def _redacted(uri: str) -> str:
    return redact(uri)


def read_record(workdir: str | Path, stage: str, key: str) -> dict[str, Any] | None:
    """The tracked runs that made the artifact `stage`/`key`, or None (made untracked)."""
    try:
        return json.loads(record_path(workdir, stage, key).read_text())
    except (OSError, ValueError):
        return None


# -- MLflow model registry ---------------------------------------------------------------------


def register_models(run: StageRun | None, models: dict[str, Path]) -> dict[str, str]:
    """Register each exported model directory in MLflow's model registry as `<pipeline>-<name>`
    (a new version whose source is the published artifact's directory, linked to the export stage's run)."""
    if not models or run is None or run.session.settings.backend != "mlflow" or not run.session.settings.mlflow.register_models:
        return {}
    client, _ = _mlflow_client(run.session)
    registered = {}
    for name, path in models.items():
        model_name = f"{run.session.pipeline}-{name}".replace("/", "-")
        try:
            if client.get_registered_model(model_name) is None:
                raise LookupError(model_name)
        except Exception:  # noqa: BLE001 - MLflow raises its own not-found error class
            client.create_registered_model(model_name, tags={"tunepipe.pipeline": run.session.pipeline})
        version = client.create_model_version(
            model_name, source=Path(path).resolve().as_uri(), run_id=run.mlflow_run_id, tags={"tunepipe.key": run.key}
        )
        registered[name] = f"{model_name}/{version.version}"
    run.runs["registered_models"] = registered
    return registered
