"""The deployed entry flow: the pipeline on a config file plus the data versions dropped so far.

`tunepipe deploy` registers this flow; its schedule runs it with `data_version=None` (every
version so far) and the watch trigger with the version the event names (every version up to it).
Stages routed to other work pools (`deployment.stage_environments`) run there as sub-runs of the
same deployment family, one segment of consecutive stages at a time; the artifact store (a
shared filesystem between workers) hands the earlier stages' artifacts over as cache hits.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from tunepipe.flows.pipeline import pipeline
from tunepipe.schemas.pipeline import PipelineConfig
from tunepipe.tasks.core.config import load_pipeline_config
from tunepipe.tasks.core.runtime import route_tunepipe_logs
from tunepipe.tasks.core.selection import StageSelection
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.ops.retrain import (
    deployment_name,
    pool_for,
    run_name,
    segment_stages,
    segments,
    versions_markdown,
    with_data_versions,
)
from tunepipe.tasks.ops.watch import Ledger

RETRAIN_FLOW = "tunepipe-retrain"


def _run_name() -> str:
    params = flow_run.parameters
    return run_name(params.get("pipeline_name"), params.get("data_version"), params.get("routed", True),
                    params.get("environment"), params.get("until"))


@flow(name=RETRAIN_FLOW, flow_run_name=_run_name)
def retrain(
    config_path: str,
    data_version: str | None = None,
    workdir: str | None = None,
    environment: str | None = None,
    until: str | None = None,
    routed: bool = True,
    pipeline_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the pipeline of `config_path` on its sources plus the data versions up to `data_version`.

    `overrides` is merged into the YAML for this run (`{"sft.training.max_steps": 50}` or nested
    mappings); `routed=False` runs every stage here (a routed segment's own run does).
    """
    route_tunepipe_logs()
    # Read on the worker, at run time: relative paths resolve against the YAML where it runs.
    config = load_pipeline_config(config_path, workdir=workdir, environment=environment, overrides=overrides)
    versions = Ledger(config.workdir).up_to(data_version)
    config = with_data_versions(config, versions)
    create_markdown_artifact(
        key="data-versions",
        markdown=versions_markdown(data_version, versions),
        description="data versions this run trains on",
    )

    selection = StageSelection(stages=config.stages(), until=until)
    stages = [s for s in config.stages() if selection.includes(s)]
    parts = segments(stages, config.environment, config.deployment.stage_environments if routed else {})
    summary: dict[str, Any] = {}
    for env, last in parts:
        if env == config.environment:
            summary = pipeline(config=config, selection=StageSelection(stages=config.stages(), until=last))
        else:
            summary = _run_segment(config, config_path, data_version, workdir, env, last, overrides, stages)
    return {**summary, "data_versions": [v.version for v in versions]}


def _run_segment(
    config: PipelineConfig, config_path: str, data_version: str | None, workdir: str | None, env: str, last: str,
    overrides: dict[str, Any] | None, stages: list[str],
) -> dict:
    """Run the stages up to `last` on `env`'s work pool and wait for the result."""
    from prefect.deployments import run_deployment
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    target = f"{RETRAIN_FLOW}/{deployment_name(config.name, env)}"
    routed = segment_stages(stages, config.environment, config.deployment.stage_environments, env, last)
    logger.info(
        "hand-off: %s run on work pool %r (profile %s) as a run of deployment %s; earlier stages come from the "
        "shared workdir's cache there; waiting for it", ", ".join(routed), pool_for(config, env), env, target,
    )
    run = run_deployment(
        target,
        parameters={
            "config_path": config_path,
            "data_version": data_version,
            "workdir": workdir,
            "environment": env,
            "until": last,
            "routed": False,
            "pipeline_name": config.name,
            "overrides": overrides,
        },
        timeout=None,
    )
    state = run.state.name if run.state else "?"
    logger.info("hand-off: flow run %r (%s) on %r ended %s", run.name, run.id, pool_for(config, env), state)
    if not run.state or not run.state.is_completed():
        message = run.state.message if run.state else "no state"
        raise StageFailed(f"{last}: the run on {env} ended {state}: {message}")
    try:
        result = run.state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - results not persisted: the sub-run's own artifacts hold its summary
        result = None
    return result if isinstance(result, dict) else {"stages": {}, "segment_run": str(run.id)}
