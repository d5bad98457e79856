"""The stage contract, and the runner that turns a stage into a cached, published artifact.

A stage is a pure function of (its config, its input artifacts' keys, its code version) to an
artifact directory. `run_stage` computes the key, returns the verified artifact when one is
published under it, and otherwise runs the stage in a staging directory that survives crashes
(so checkpoints there let a rerun resume), then publishes it atomically.
"""

from __future__ import annotations

import abc
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from tunepipe.schemas.base import StrictModel
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.graph import required_inputs
from tunepipe.schemas.manifest import ArtifactRef, Manifest, Timings
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.fingerprint import code_identity, stage_key
from tunepipe.tasks.core.tracking import TrackingSession, log_stage_results, tracked_stage

SUMMARY_FILE = "summary.md"
TABLE_FILE = "summary_table.json"
CHECKPOINT_DIR = ".checkpoints"  # hidden: removed before publishing, never part of an artifact



class StageFailed(RuntimeError):
    """A stage refused its input or could not finish; the message says what, how many and where."""


class _QuietExpectedFailures:
    """Wraps the log record factory: a record carrying a StageFailed (Prefect logs a failed task
    with its traceback) keeps its one-line message and loses the traceback, which says nothing
    the message does not. `tunepipe --debug` does not install it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        record = self.inner(*args, **kwargs)
        if record.exc_info and isinstance(record.exc_info[1], StageFailed):
            record.exc_info, record.exc_text = None, None
        return record


def quiet_expected_failures() -> None:
    """Log expected failures (StageFailed) without tracebacks, in this process (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _QuietExpectedFailures):
        logging.setLogRecordFactory(_QuietExpectedFailures(factory))


@dataclass
class StageOutput:
    """What a stage returns besides the files it wrote."""

    metrics: dict[str, Any]
    summary: str = ""
    table: list[dict[str, Any]] | None = None


@dataclass
class StageContext:
    """Everything a stage may use while it runs."""

    stage: str
    key: str
    staging_dir: Path
    inputs: dict[str, ArtifactRef]
    env: EnvironmentProfile
    logger: logging.Logger
    # The config payload the key was computed from: a stage that reads files whose digests are
    # in it (the data stage) checks that it read those very bytes.
    key_payload: Any = None
    checkpoint_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        # Checkpoints live under the key's staging dir, so a rerun after a crash finds them.
        self.checkpoint_dir = self.staging_dir / CHECKPOINT_DIR


class Stage(abc.ABC):
    """One pipeline stage. Subclasses set the class attributes and implement `run`."""

    name: ClassVar[str]
    config_model: ClassVar[type[StrictModel]]
    # A resumable stage keeps its staging dir (and checkpoints) across crashes; any other
    # stage starts from an empty one, so files of a failed attempt never get published.
    resumable: ClassVar[bool] = False

    def key_payload(self, config: StrictModel) -> Any:
        """What of the config enters the key; override to replace paths with content digests."""
        return config.model_dump(mode="json")

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        """The profile fields that change this stage's result (batch size, dtype, ...)."""
        return {}

    def tracked_models(self, artifact_dir: Path) -> dict[str, Path]:
        """Model directories of a published artifact for the tracker's model registry ({name: dir}); none by default."""
        return {}

    @abc.abstractmethod
    def run(self, config: StrictModel, ctx: StageContext) -> StageOutput:
        """Compute the artifact into `ctx.staging_dir`."""


@dataclass(frozen=True)
class StageIdentity:
    """A stage's key and the exact payloads it was computed from."""

    key: str
    config_payload: Any
    env_payload: dict[str, Any]
    input_keys: dict[str, str]
    code: str
    libraries: dict[str, str]


def identify(stage: Stage, config: StrictModel, inputs: dict[str, ArtifactRef], env: EnvironmentProfile) -> StageIdentity:
    config_payload = stage.key_payload(config)
    env_payload = stage.env_payload(env)
    input_keys = {name: ref.key for name, ref in inputs.items()}
    code = code_identity(type(stage).__module__)
    key = stage_key(stage.name, config_payload, env_payload, input_keys, code.version)
    return StageIdentity(key, config_payload, env_payload, input_keys, code.version, code.libraries)


def run_stage(
    stage: Stage,
    config: StrictModel,
    inputs: dict[str, ArtifactRef],
    store: ArtifactStore,
    env: EnvironmentProfile,
    *,
    refresh: bool = False,
    logger: logging.Logger | None = None,
    tracking: "TrackingSession | None" = None,
) -> ArtifactRef:
    """Return the stage's artifact: the published one under its key, or a freshly computed one.

    `tracking`: the pipeline run's experiment tracking; only a stage that runs is tracked."""
    logger = logger or logging.getLogger(f"tunepipe.{stage.name}")
    _check_required_inputs(stage.name, inputs)
    identity = identify(stage, config, inputs, env)
    with store.lock(stage.name, identity.key):
        if not refresh and (ref := store.lookup(stage.name, identity.key)) is not None:
            logger.info("%s: cached artifact %s", stage.name, ref.path)
            return ref
        staging = store.open_staging(stage.name, identity.key, fresh=not stage.resumable)
        if any(staging.iterdir()):
            logger.info("%s: resuming in %s", stage.name, staging)
        ctx = StageContext(stage.name, identity.key, staging, inputs, env, logger, identity.config_payload)
        seed_process(int(identity.key, 16))
        started, clock = _utc_now(), time.perf_counter()
        with tracked_stage(tracking, stage.name, identity.key, identity.input_keys) as tracked:
            output = stage.run(config, ctx)
        seconds = time.perf_counter() - clock
        _write_summary(staging, output)
        shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
        manifest = Manifest(
            stage=stage.name,
            key=identity.key,
            code_version=identity.code,
            config=identity.config_payload,
            environment=identity.env_payload,
            inputs={name: {"stage": ref.stage, "key": ref.key} for name, ref in inputs.items()},
            libraries=identity.libraries,
            metrics=output.metrics,
            timings=Timings(started_at=started, finished_at=_utc_now(), seconds=round(seconds, 3)),
        )
        ref = store.publish(staging, manifest)
        logger.info("%s: published %s in %.1fs", stage.name, ref.path, seconds)
        log_stage_results(tracked, output.metrics, Path(ref.path), models=stage.tracked_models(Path(ref.path)) if tracked else None)
        return ref


def _check_required_inputs(name: str, inputs: dict[str, ArtifactRef]) -> None:
    missing = [needed for needed in required_inputs(name) if needed not in inputs]
    if missing:
        raise StageFailed(
            f"{name}: needs the `{missing[0]}` stage's artifact as input `{missing[0]}`"
            + (f" (and {', '.join(missing[1:])})" if missing[1:] else "")
        )


def seed_process(seed: int) -> None:
    """Seed every RNG this process has loaded, so a stage draws the same numbers whatever ran in
    the process before it. A safety net: training jobs seed themselves from their config too,
    since launched workers never pass through here."""
    seed %= 2**32
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def read_summary(ref: ArtifactRef) -> tuple[str, list[dict[str, Any]] | None]:
    """The markdown summary and table a stage wrote with its artifact."""
    path = Path(ref.path)
    summary = (path / SUMMARY_FILE).read_text() if (path / SUMMARY_FILE).exists() else ""
    table = json.loads((path / TABLE_FILE).read_text()) if (path / TABLE_FILE).exists() else None
    return summary, table


def _write_summary(staging: Path, output: StageOutput) -> None:
    # Kept in the artifact so a cached run can show the same summary without recomputing.
    (staging / SUMMARY_FILE).write_text(output.summary or "")
    if output.table is not None:
        (staging / TABLE_FILE).write_text(json.dumps(output.table, indent=1, default=str))




def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
