"""Tiny stages for testing the stage machinery without any ML library."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import Field

from tunepipe.schemas.base import StrictModel
from tunepipe.tasks.core.stage import Stage, StageContext, StageOutput


class ToyConfig(StrictModel):
    text: str = Field(default="hello", description="Text to write.")
    repeat: int = Field(default=2, ge=1, description="Times to repeat it.")
    sleep_per_chunk: float = Field(default=0.0, ge=0, description="Seconds to sleep after each chunk (for kill tests).")


class Producer(Stage):
    name = "producer"
    config_model = ToyConfig

    def run(self, config: ToyConfig, ctx: StageContext) -> StageOutput:
        out = ctx.staging_dir / "out.txt"
        with open(out, "w") as handle:
            for _ in range(config.repeat):
                handle.write(config.text + "\n")
                handle.flush()
                time.sleep(config.sleep_per_chunk)
        (ctx.staging_dir / "pid").write_text(str(os.getpid()))
        return StageOutput(metrics={"lines": config.repeat}, summary=f"wrote {config.repeat} lines", table=[{"lines": config.repeat}])


class Consumer(Stage):
    name = "consumer"
    config_model = ToyConfig

    def run(self, config: ToyConfig, ctx: StageContext) -> StageOutput:
        upstream = Path(ctx.inputs["producer"].path) / "out.txt"
        lines = upstream.read_text().splitlines()
        (ctx.staging_dir / "count.txt").write_text(f"{len(lines)} {config.text}\n")
        return StageOutput(metrics={"upstream_lines": len(lines)})


class Counter(Stage):
    """Resumable: counts to `repeat`, one checkpoint file per step, resuming from the last."""

    name = "counter"
    config_model = ToyConfig
    resumable = True

    def run(self, config: ToyConfig, ctx: StageContext) -> StageOutput:
        ctx.checkpoint_dir.mkdir(exist_ok=True)
        done = sorted(int(p.stem) for p in ctx.checkpoint_dir.glob("*.ckpt"))
        start = done[-1] + 1 if done else 0
        for step in range(start, config.repeat):
            time.sleep(config.sleep_per_chunk)
            (ctx.checkpoint_dir / f"{step}.ckpt").write_text(str(os.getpid()))
        (ctx.staging_dir / "result.txt").write_text(f"resumed_from={start}\n")
        return StageOutput(metrics={"resumed_from": start, "steps": config.repeat})
