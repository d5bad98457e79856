"""Thin Prefect wrappers: a stage becomes a task whose cache key is the stage's content key.

The Prefect cache key is offered only while a verified artifact is published under the stage
key, so Prefect never hands back a reference to an artifact that was deleted or corrupted.
It carries a tag of the store's root because the cached value is a reference holding a path:
two workdirs sharing one Prefect result store must not hand each other their paths.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import CachePolicy
from prefect.logging import get_run_logger
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.fingerprint import sha256_bytes
from tunepipe.tasks.core.graph import get_stage
from tunepipe.tasks.core.stage import identify, read_summary, run_stage
from tunepipe.tasks.core.tracking import TrackingSession


def artifact_store(workdir: str | Path) -> ArtifactStore:
    return ArtifactStore(Path(workdir) / "artifacts")


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache on the stage key, and only while its artifact verifies."""

    stage_name: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        if inputs.get("refresh"):
            return None
        stage = get_stage(self.stage_name)
        store = artifact_store(inputs["workdir"])
        identity = identify(stage, inputs["config"], inputs["inputs"], inputs["env"])
        if store.lookup(stage.name, identity.key) is None:
            return None
        return f"{stage.name}-{identity.key}-{sha256_bytes(str(store.root).encode())[:8]}"


def stage_result_storage(workdir: str | Path) -> Path:
    """Where the stage tasks' Prefect results (and so their cache records) live: with the
    artifacts, in the workdir, not in the Prefect home of whichever process ran the flow.

    A worker with its own Prefect home (a GPU host's) then finds the records the first worker
    wrote and shows reused stages as `Cached` instead of running them again; it is the path
    `tunepipe run` used already (its Prefect home is `<workdir>/.prefect`).
    """
    return Path(workdir).resolve() / ".prefect" / "storage"


def prefect_key(stage_name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return stage_name.replace("_", "-").lower()


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.(?:png|jpe?g|svg))\)")
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def inline_images(markdown: str, directory: str | Path) -> str:
    """The summary's image links to files of the artifact, as `data:` URIs.

    The Prefect UI renders a markdown artifact in the browser, which cannot read the artifact's files:
    a relative link (`![ab](ab.png)`, right in report.md next to the file) resolved against the UI's
    own URL and showed a broken image. Embedded, the plot travels with the artifact. Links that are
    not files of this artifact (URLs, missing files) are left as they are."""
    root = Path(directory).resolve()

    def embed(match: re.Match) -> str:
        target = (root / match.group(2)).resolve()
        if "://" in match.group(2) or not target.is_file() or root not in target.parents:
            return match.group(0)
        data = base64.b64encode(target.read_bytes()).decode()
        return f"![{match.group(1)}](data:{_IMAGE_TYPES[target.suffix.lower()]};base64,{data})"

    return _IMAGE_LINK.sub(embed, markdown)


def publish_stage_artifacts(ref: ArtifactRef) -> None:
    """The stage's summary (markdown, its plots embedded) and table in the Prefect UI."""
    summary, table = read_summary(ref)
    summary = inline_images(summary, ref.path)
    header = f"**{ref.stage}** `{ref.key}` {'(cached)' if ref.cached else ''}\n\n`{ref.path}`\n\n"
    create_markdown_artifact(key=f"{prefect_key(ref.stage)}-summary", markdown=header + summary, description=f"{ref.stage} summary")
    if table:
        create_table_artifact(key=f"{prefect_key(ref.stage)}-table", table=table, description=f"{ref.stage} results")


def stage_task(stage_name: str):
    """The Prefect task that runs one stage through `run_stage`."""

    @task(
        name=stage_name,
        # `tunepipe` and the stage: Prefect's tag-based concurrency limits can target training stages
        # (`prefect concurrency-limit create sft 1`); the pipeline's tag comes from the flow run.
        tags=["tunepipe", stage_name],
        cache_policy=StageCachePolicy(stage_name=stage_name),
        persist_result=True,
        retries=0,
    )
    def run(
        config: Any, inputs: dict[str, ArtifactRef], env: EnvironmentProfile, workdir: str, refresh: bool = False,
        tracking: TrackingSession | None = None,
    ) -> ArtifactRef:
        # `tracking` is not in the cache key (StageCachePolicy reads config, inputs and env only).
        ref = run_stage(
            get_stage(stage_name), config, inputs, artifact_store(workdir), env, refresh=refresh, logger=get_run_logger(),
            tracking=tracking,
        )
        publish_stage_artifacts(ref)
        return ref

    return run
