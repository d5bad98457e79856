"""The retraining run's plain logic: which data it trains on and where its stages run.

`flows/retrain.py` wires these into the deployed flow; kept here so the flow holds no logic.
"""

from __future__ import annotations

from pathlib import Path

from tunepipe.schemas.graph import STAGE_ORDER
from tunepipe.schemas.pipeline import PipelineConfig
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.ops.watch import DataVersion


DEFAULT_POOL = "tunepipe"


def pool_for(config: PipelineConfig, environment: str | None = None) -> str:
    """The work pool of the pipeline (or of a routed profile): config, then profile, then default."""
    if environment is None and config.deployment.work_pool:
        return config.deployment.work_pool
    profile = load_environment(environment or config.environment)
    return profile.work_pool or DEFAULT_POOL


def with_data_versions(config: PipelineConfig, versions: list[DataVersion]) -> PipelineConfig:
    """The config with one data source per data version, read as `watch.source` says."""
    if not versions:
        return config
    template = config.watch.source.model_dump() if config.watch else {}
    dumped = config.model_dump(mode="json")
    dumped["data"]["sources"] += [{**template, "path": v.path} for v in versions]
    return PipelineConfig.model_validate(dumped)


def segments(stages: list[str], default_env: str, routed: dict[str, str]) -> list[tuple[str, str]]:
    """(environment, last stage) per run of consecutive stages on one profile, in order.

    A routed stage starts a segment on its profile; the stages after it stay there until the
    next routed stage (training, reward and alignment usually share the GPU pool).
    """
    return [(env, names[-1]) for env, names in _segment_runs(stages, default_env, routed)]


def segment_stages(stages: list[str], default_env: str, routed: dict[str, str], env: str, last: str) -> list[str]:
    """The stages of the segment on `env` that ends at `last` (for the hand-off's log line)."""
    for segment_env, names in _segment_runs(stages, default_env, routed):
        if last in names:
            return names[: names.index(last) + 1] if segment_env == env else []
    return []


def _segment_runs(stages: list[str], default_env: str, routed: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(environment, its stages) per run of consecutive stages on one profile, in stage order."""
    runs: list[tuple[str, list[str]]] = []
    env = default_env
    for stage in sorted(stages, key=STAGE_ORDER.index):
        env = routed.get(stage, env)
        if runs and runs[-1][0] == env:
            runs[-1][1].append(stage)
        else:
            runs.append((env, [stage]))
    return runs


def run_name(pipeline: str | None, data_version: str | None, routed: bool = True, environment: str | None = None,
             until: str | None = None) -> str:
    """`<pipeline>@<version>`; a routed segment's run (routed=False with a profile) says what it is:
    `<pipeline>@<version> → <profile> (up to <stage>)`, so it never reads as its parent."""
    base = f"{pipeline or 'retrain'}@{data_version or 'all-data'}"
    if routed or not environment:
        return base
    return f"{base} → {Path(environment).stem}" + (f" (up to {until})" if until else "")


def deployment_name(pipeline: str, environment: str | None = None) -> str:
    """`<pipeline>`, or `<pipeline>--<profile>` for a routed segment's deployment."""
    if environment is None:
        return pipeline
    return f"{pipeline}--{Path(environment).stem}"


def versions_markdown(requested: str | None, versions: list[DataVersion]) -> str:
    lines = [f"# Data versions (run for `{requested or 'all'}`)", "", "| seq | version | files |", "|---|---|---|"]
    for v in versions:
        lines.append(f"| {v.seq} | `{v.version}` | {', '.join(f['name'] for f in v.files)} |")
    if not versions:
        lines.append("| - | (none: configured sources only) | |")
    return "\n".join(lines)
