"""The align job: what the align stage hands its training entry point (tasks/align/train.py), in
process or through a launcher. Its own module, so the policy loading and the method units can name it
without importing the entry point that dispatches to them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.jobs import TrainingJob
from tunepipe.schemas.methods import MethodConfig


class AlignJob(TrainingJob):
    """One align run, as the stage hands it to `align_job` (through a launcher or not)."""

    config: AlignConfig
    run: str = Field(description="The run's name: a task (per-task SFT adapters) or `all`.")
    sft_dir: str = Field(description="The SFT adapter (or full model) this run continues.")
    sft_kind: Literal["adapter", "adapters", "model"] = Field(description="The SFT artifact's kind.")
    sft_method: MethodConfig = Field(description="The SFT run's method (decides how the base loads: 4-bit for qlora).")
    base_model: str = Field(description="The base the SFT adapter was trained on (the SFT model itself for a full-model SFT).")
    reward_dir: str | None = Field(default=None, description="The reward artifact, when the pipeline has one.")
    train_pairs: list[dict[str, Any]] = Field(default_factory=list, description="Train preference pairs (dataset source).")
    prompts: list[dict[str, Any]] = Field(default_factory=list, description="Train prompts with reference answers.")
    pairs_file: str = Field(description="Where on-policy pairs are written.")
    save_to: str = Field(description="The adapter's directory under output_dir.")
    judge_cache: str = Field(description="The AI judge's cache file.")
