"""The stage graph: which stages exist, in what order, and which artifacts each reads.

Kept apart from `pipeline.py` so the stage runner can check required inputs without every
stage's key depending on every other stage's config schema.
"""

from __future__ import annotations

from pydantic import Field
from tunepipe.schemas.base import StrictModel


class StageNode(StrictModel):
    """One stage of the graph: what it reads. Its code is `tunepipe.tasks.<name>.stage:<stage_class>`."""

    stage_class: str = Field(description="The Stage class in `tunepipe/tasks/<name>/stage.py`.")
    inputs: tuple[str, ...] = Field(default=(), description="Upstream stages whose artifacts it reads when the pipeline has them.")
    required: tuple[str, ...] = Field(default=(), description="Those of `inputs` it cannot run without.")


# The stage graph, declared once. Order is pipeline order: a stage reads only stages before it.
# The pipeline flow walks it, the config validator checks required sections against it, and the
# stage runner refuses a run whose required inputs are missing.
STAGE_GRAPH: dict[str, StageNode] = {
    "data": StageNode(stage_class="DataStage"),
    "base_model": StageNode(stage_class="BaseModelStage", inputs=("data",), required=("data",)),
    "pretrain": StageNode(stage_class="PretrainStage", inputs=("data", "base_model"), required=("data",)),
    "sft": StageNode(stage_class="SFTStage", inputs=("data", "base_model", "pretrain"), required=("data",)),
    "reward": StageNode(stage_class="RewardStage", inputs=("data", "base_model", "pretrain", "sft"), required=("data",)),
    "align": StageNode(
        stage_class="AlignStage", inputs=("data", "base_model", "pretrain", "sft", "reward"), required=("data", "sft")
    ),
    "evaluate": StageNode(
        stage_class="EvaluateStage", inputs=("data", "base_model", "pretrain", "sft", "reward", "align"), required=("data", "sft")
    ),
    "export": StageNode(
        stage_class="ExportStage", inputs=("data", "base_model", "pretrain", "sft", "align", "evaluate"), required=("data", "sft")
    ),
    "deploy": StageNode(stage_class="DeployStage", inputs=("export", "evaluate"), required=("export",)),
}
STAGE_ORDER: tuple[str, ...] = tuple(STAGE_GRAPH)


def required_inputs(name: str) -> tuple[str, ...]:
    """The upstream artifacts a stage cannot run without (none declared for plugin stages)."""
    return STAGE_GRAPH[name].required if name in STAGE_GRAPH else ()
