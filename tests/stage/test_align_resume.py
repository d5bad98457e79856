"""The align stage killed mid-training resumes from its last checkpoint instead of starting over,
and does not retrain a per-task run that finished before the kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.core.stage import run_stage
from tests.conftest import REPO
from tests.helpers.alignment import ANSWERS, data_with_pairs, env
from tests.helpers.training import SLOW_STEPS, WORDS, build_tiny_model, kill_at_first_checkpoint, write_data_artifact

torch.set_num_threads(1)



def align_kill_script(store_root: Path, inputs: dict[str, ArtifactRef], config: dict) -> str:
    """A child process running the align stage (to be killed mid-training)."""
    refs = {name: ref.model_dump() for name, ref in inputs.items()}
    return textwrap.dedent(
        f"""
        import json
        from tunepipe.schemas.align import AlignConfig
        from tunepipe.schemas.manifest import ArtifactRef
        from tunepipe.tasks.align.stage import AlignStage
        from tunepipe.tasks.core.artifacts import ArtifactStore
        from tunepipe.tasks.core.stage import run_stage
        from tests.helpers.alignment import env
        config = AlignConfig.model_validate(json.loads({json.dumps(json.dumps(config))}))
        inputs = {{name: ArtifactRef.model_validate(ref) for name, ref in {refs!r}.items()}}
        run_stage(AlignStage(), config, inputs, ArtifactStore({str(store_root)!r}), env())
        """
    )




def _per_task_sft(tmp_path: Path) -> dict:
    """Tiny model, data with preference pairs of both tasks, and per-task LoRA SFT adapters (2 steps each)."""
    model = build_tiny_model(tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    store = ArtifactStore(tmp_path / "artifacts")
    sft_config = SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "lora", "r": 4}, "max_length": 64, "adapters": "per_task",
         "training": {"max_steps": 2, "warmup_ratio": 0.0}, "heldout": {"max_examples_per_task": 0}}
    )
    sft = run_stage(SFTStage(), sft_config, {"data": data}, store, env())
    pairs = [
        {"id": f"{task}{i}", "task": task, "prompt": f"Describe the {w}.", "chosen": ANSWERS[0], "rejected": ANSWERS[1], "split": "train"}
        for task in ("count", "sentiment") for i, w in enumerate(WORDS[:8])
    ]
    assets = {"root": tmp_path, "data": data}
    return {"store_root": store.root, "sft": sft, "data": data_with_pairs(assets, "data-pairs", pairs)}


def test_killed_align_resumes_and_keeps_finished_task_runs(tmp_path):
    assets = _per_task_sft(tmp_path)
    runs = list(json.loads((Path(assets["sft"].path) / "outputs.json").read_text())["paths"])
    assert sorted(runs) == ["count", "sentiment"]
    finished, killed = runs  # the stage trains them in this order
    config = {
        "method": {"name": "dpo", "beta": 0.1}, "max_length": 64,
        "heldout": {"max_pairs": 0, "max_examples_per_task": 0},
        "training": {"max_steps": 6, "save_steps": 2, "save_total_limit": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0},
    }
    inputs = {"data": assets["data"], "sft": assets["sft"]}
    root = Path(assets["store_root"])
    script = SLOW_STEPS + align_kill_script(root, inputs, config)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = kill_at_first_checkpoint(proc, root, "align", killed, timeout_s=120)
    print(f"killed after {time.monotonic() - started:.1f}s")
    assert done and done[-1] < 6, f"killed too late: {done}"
    assert ArtifactStore(root).published("align") == []
    (staging,) = root.glob("align/.staging/*")
    finished_metrics = json.loads((staging / ".checkpoints" / f"{finished}.metrics.json").read_text())
    finished_weights = staging / "adapters" / finished / "adapter_model.safetensors"
    finished_mtime = finished_weights.stat().st_mtime_ns

    rerun = time.monotonic()
    ref = run_stage(AlignStage(), AlignConfig.model_validate(config), inputs, ArtifactStore(root), env())
    print(f"rerun took {time.monotonic() - rerun:.1f}s")
    out = Path(ref.path)
    metrics = json.loads((out / "metrics.json").read_text())["runs"]
    # The finished run is taken as it was: same metrics, same adapter file (not rewritten).
    assert metrics[finished] == finished_metrics
    assert finished_metrics["resumed_from"] is None and finished_metrics["global_step"] == 6
    assert (out / "adapters" / finished / "adapter_model.safetensors").stat().st_mtime_ns == finished_mtime
    # The killed run continues from its last checkpoint; its loss history holds the killed attempt's steps too.
    assert metrics[killed]["resumed_from"] == done[-1]
    assert metrics[killed]["global_step"] == 6
    assert [p["step"] for p in metrics[killed]["loss_history"]] == list(range(1, 7))
    assert [p["step"] for p in metrics[killed]["step_metrics"]["margin"]] == list(range(1, 7))
    assert not (out / ".checkpoints").exists()
    assert json.loads((out / "outputs.json").read_text())["paths"] == {t: f"adapters/{t}" for t in runs}
    assert all((out / "adapters" / t / "adapter_model.safetensors").exists() for t in runs)
