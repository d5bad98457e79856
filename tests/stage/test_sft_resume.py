"""The sft stage killed mid-training resumes from its last checkpoint instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.core.stage import run_stage
from tests.conftest import REPO
from tests.helpers.training import SLOW_STEPS, build_tiny_model, cpu_profile, kill_at_first_checkpoint, kill_script, write_data_artifact





def test_killed_sft_resumes_from_last_checkpoint(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    config = {
        "model": str(model), "method": {"name": "lora", "r": 4}, "max_length": 64,
        "training": {"max_steps": 6, "save_steps": 2, "save_total_limit": 3, "warmup_ratio": 0.0},
    }
    root = tmp_path / "artifacts"
    script = SLOW_STEPS + kill_script(root, data, config)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # While the child starts up, load the training libraries here for the rerun.
    import matplotlib.pyplot  # noqa: F401
    import trl  # noqa: F401

    done = kill_at_first_checkpoint(proc, root, "sft", "all", timeout_s=90)
    print(f"killed after {time.monotonic() - started:.1f}s")
    assert done and done[-1] < 6, f"killed too late: {done}"
    assert ArtifactStore(root).published("sft") == []

    rerun = time.monotonic()
    ref = run_stage(SFTStage(), SFTConfig.model_validate(config), {"data": data}, ArtifactStore(root), cpu_profile())
    print(f"rerun took {time.monotonic() - rerun:.1f}s")
    metrics = json.loads((Path(ref.path) / "metrics.json").read_text())["all"]
    assert metrics["resumed_from"] == done[-1]
    assert metrics["global_step"] == 6
    # The loss history carries the steps of the killed attempt too (restored trainer state).
    assert [p["step"] for p in metrics["loss_history"]] == list(range(1, 7))
    assert not (Path(ref.path) / ".checkpoints").exists()
    assert (Path(ref.path) / "adapter" / "adapter_model.safetensors").exists()
