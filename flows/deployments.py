"""Deployments of the retrain flow (`tunepipe deploy`): schedule, data-drop trigger, work pools.

Why `to_deployment(entrypoint_type=MODULE_PATH).apply()` and not `flow.deploy()` or `serve`:
tunepipe is an installed package, so a worker imports `flows.retrain:retrain` from its own
environment. That works unchanged for a process pool (no Docker, no code storage, no pull step)
and for Docker/Kubernetes pools whose image has tunepipe installed (`job_variables.image`).
`flow.deploy()` insists on an image or remote code storage; `serve()` runs flows inside the
serving process, not through a work pool, so stages could not be sent to GPU workers.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from tunepipe.schemas.operations import DATA_VERSION_EVENT
from tunepipe.schemas.pipeline import PipelineConfig
from tunepipe.tasks.ops.prefect_server import ensure_process_pool, require_server
from tunepipe.tasks.ops.retrain import deployment_name, pool_for

def pools(config: PipelineConfig) -> list[str]:
    """Every work pool the config's deployments use, the pipeline's first."""
    names = [pool_for(config)]
    for env in config.deployment.stage_environments.values():
        if (name := pool_for(config, env)) not in names:
            names.append(name)
    return names


def schedules(config: PipelineConfig) -> list[Any]:
    from prefect.schedules import Cron, Interval

    schedule = config.schedule
    if schedule is None:
        return []
    if schedule.cron is not None:
        return [Cron(schedule.cron, timezone=schedule.timezone, active=schedule.active)]
    return [Interval(datetime.timedelta(seconds=schedule.interval_s), timezone=schedule.timezone, active=schedule.active)]


def data_drop_trigger(config: PipelineConfig) -> Any:
    """Run the deployment for every data version the watcher announces for this pipeline and workdir."""
    from prefect.events import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=f"{config.name}-data-drop",
        expect={DATA_VERSION_EVENT},
        match={
            "prefect.resource.id": "tunepipe.data-version.*",
            "tunepipe.pipeline": config.name,
            "tunepipe.workdir": str(Path(config.workdir).resolve()),
        },
        parameters={"data_version": "{{ event.payload.version }}"},
    )


def build_deployments(config_path: str | Path, config: PipelineConfig, *, workdir: str | None = None, environment: str | None = None):
    """The pipeline's deployment, and one per routed profile (no schedule or trigger of their own)."""
    from prefect.client.schemas.objects import (
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )
    from prefect.deployments.runner import EntrypointType
    from tunepipe.flows.retrain import retrain  # lazy: pulls in prefect

    parameters = {
        "config_path": str(Path(config_path).resolve()),
        "workdir": workdir,
        "environment": environment,
        "pipeline_name": config.name,
    }
    tags = ["tunepipe", config.name, *config.deployment.tags]
    main = retrain.to_deployment(
        name=deployment_name(config.name),
        schedules=schedules(config),
        triggers=[data_drop_trigger(config)] if config.watch is not None else None,
        parameters=parameters,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=config.deployment.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        description=f"tunepipe pipeline {config.name} ({config_path})",
        tags=tags,
        work_pool_name=pool_for(config),
        work_queue_name=config.deployment.work_queue,
        job_variables=dict(config.deployment.job_variables),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    out = [main]
    for env in dict.fromkeys(config.deployment.stage_environments.values()):
        out.append(
            retrain.to_deployment(
                name=deployment_name(config.name, env),
                parameters={**parameters, "environment": env, "routed": False},
                description=f"tunepipe pipeline {config.name}: stages routed to profile {env}",
                tags=[*tags, f"profile:{Path(env).stem}"],
                work_pool_name=pool_for(config, env),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def register_deployments(
    config_path: str | Path, config: PipelineConfig, *, workdir: str | None = None, environment: str | None = None, api_url: str
) -> dict[str, UUID]:
    """Register (or update) the deployments against the server at `api_url`; creates missing pools."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    require_server(api_url)
    for pool in pools(config):
        ensure_process_pool(pool, api_url)
    ids = {}
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        for deployment in build_deployments(config_path, config, workdir=workdir, environment=environment):
            ids[deployment.full_name] = deployment.apply()
    return ids
