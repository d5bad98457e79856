"""The pipeline flow: walks the stage graph (`schemas/graph.py`) and passes artifact references along."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from prefect import flow, tags
from prefect.runtime import flow_run

from tunepipe.schemas.graph import STAGE_GRAPH
from tunepipe.schemas.pipeline import PipelineConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.prefect_stage import stage_result_storage, stage_task
from tunepipe.tasks.core.runtime import route_tunepipe_logs
from tunepipe.tasks.core.selection import StageSelection
from tunepipe.tasks.core.tracking import TrackingSession, finish_pipeline_run
from tunepipe.tasks.ops.notify import on_completion, on_failure
from tunepipe.tasks.ops.run_summary import summarize_run

STAGE_TASKS = {name: stage_task(name) for name in STAGE_GRAPH}


def run_name() -> str:
    """`<pipeline>-<UTC time>-<4 hex of the run id>`: every run of a pipeline tells apart in the UI."""
    config = flow_run.parameters.get("config")
    name = config.get("name") if isinstance(config, dict) else getattr(config, "name", "pipeline")
    return f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{str(flow_run.id)[:4]}"


# The hooks send the `notifications:` (failure: stage, reason, fix; completion and gate verdicts).
@flow(name="tunepipe-pipeline", flow_run_name=run_name, on_failure=[on_failure], on_completion=[on_completion])
def pipeline(config: PipelineConfig, selection: StageSelection) -> dict[str, Any]:
    route_tunepipe_logs()
    with tags("tunepipe", f"pipeline:{config.name}"):  # on every task run and sub-flow run of this run
        return _run_stages(config, selection)


def _run_stages(config: PipelineConfig, selection: StageSelection) -> dict[str, Any]:
    env = load_environment(config.environment)
    storage = stage_result_storage(config.workdir)
    tracking = TrackingSession(config.tracking, config.name, config.workdir, str(flow_run.id))
    refs: dict[str, Any] = {}
    failed = True
    try:
        for name, node in STAGE_GRAPH.items():
            if not selection.includes(name):
                continue
            upstream = {source: refs[source] for source in node.inputs if source in refs}
            task = STAGE_TASKS[name].with_options(result_storage=storage)
            refs[name] = task(
                getattr(config, name), upstream, env=env, workdir=config.workdir, refresh=selection.refresh(name), tracking=tracking
            )
        failed = False
    finally:
        finish_pipeline_run(tracking, failed=failed)
    return summarize_run(config.workdir, refs)
