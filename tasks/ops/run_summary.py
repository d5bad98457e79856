"""The run's summary: the CLI's JSON and the Prefect UI's run-summary artifact."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.artifacts import read_manifest
from tunepipe.tasks.core.tracking import read_record


def run_summary(run_id: str, workdir: str, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    stages = {}
    for name, ref in refs.items():
        manifest = read_manifest(ref.path)
        stages[name] = {"key": ref.key, "path": ref.path, "cached": ref.cached, "metrics": manifest.metrics,
                        # the tracked runs that made the artifact (this run's, or an earlier one's for a cached stage)
                        "tracking": read_record(workdir, name, ref.key)}
    return {"run_id": run_id, "workdir": workdir, "stages": stages}


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Run `{summary['run_id']}`",
        "",
        f"workdir: `{summary['workdir']}`",
        "",
        "| stage | key | cached | artifact | tracked run |",
        "|---|---|---|---|---|",
    ]
    for name, stage in summary["stages"].items():
        tracked = stage.get("tracking") or {}
        run = f"{tracked['backend']}: `{(tracked.get('runs') or {}).get('stage', tracked.get('name'))}`" if tracked else ""
        lines.append(f"| {name} | `{stage['key']}` | {stage['cached']} | `{stage['path']}` | {run} |")
    lines += ["", "Each stage's own summary and table are the artifacts `<stage>-summary` and `<stage>-table`."]
    return "\n".join(lines)


@task(name="run-summary", cache_policy=NO_CACHE)
def summarize_run(workdir: str, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    summary = run_summary(str(flow_run.id), workdir, refs)
    create_markdown_artifact(key="run-summary", markdown=summary_markdown(summary), description="tunepipe run summary")
    return summary
