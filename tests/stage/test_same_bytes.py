"""Same key ⇒ same bytes: a training stage publishes identical weights whatever the process drew
before it, in one process and in another.

Each run happens after a different amount of unrelated random drawing (Python, NumPy, torch), as
in a process that computed other stages first; every file of the published artifacts must match.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.alignment import build_assets, data_with_pairs, env, quickstart_pairs
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact
from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.reward.stage import RewardStage
from tunepipe.tasks.sft.stage import SFTStage

REPO = Path(__file__).resolve().parents[2]
# Dropout on, so that dropout masks (not only the adapter's initialisation) must be seeded too.
SFT = {"method": {"name": "lora", "r": 4, "dropout": 0.1}, "max_length": 64,
       "training": {"max_steps": 3, "warmup_ratio": 0.0}, "heldout": {"max_examples_per_task": 0}}


def draw_noise(n: int) -> None:
    """What an earlier stage in the same process might have drawn."""
    random.random()
    for _ in range(n):
        random.random()
    np.random.rand(n)
    torch.rand(n)


def weight_files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*.safetensors"))
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("same-bytes")
    return {"root": root, "model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def sft_config(assets) -> SFTConfig:
    return SFTConfig.model_validate({"model": str(assets["model"]), **SFT})


def test_sft_weights_do_not_depend_on_earlier_draws_in_the_process(assets, tmp_path):
    refs = []
    for n, store in ((0, "a"), (1234, "b")):
        draw_noise(n)
        refs.append(run_stage(SFTStage(), sft_config(assets), {"data": assets["data"]}, ArtifactStore(tmp_path / store), cpu_profile()))
    assert refs[0].key == refs[1].key
    first, second = weight_files(refs[0].path), weight_files(refs[1].path)
    assert first and first == second


def test_the_sft_job_seeds_itself(assets, tmp_path):
    """Launched workers never pass through the stage runner: the job itself must seed every RNG
    before the adapter's initialisation draws (the runner's seeding is only a safety net)."""
    from tunepipe.tasks.sft.train import sft_trainer

    job = {
        "config": sft_config(assets).model_dump(mode="json"), "env": cpu_profile().model_dump(mode="json"),
        "model_path": str(assets["model"]), "data_dir": assets["data"].path, "tasks": None,
        "output_dir": str(tmp_path), "save_to": "out", "checkpoint_dir": str(tmp_path / "ckpt"),
    }
    initial = []
    for n in (0, 999):
        draw_noise(n)
        trainer, _ = sft_trainer(job)
        initial.append({k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k})
    assert initial[0] and initial[0].keys() == initial[1].keys()
    assert all(torch.equal(initial[0][k], initial[1][k]) for k in initial[0])


def test_sft_weights_are_the_same_in_another_process(assets, tmp_path):
    draw_noise(77)
    here = run_stage(SFTStage(), sft_config(assets), {"data": assets["data"]}, ArtifactStore(tmp_path / "here"), cpu_profile())
    script = textwrap.dedent(f"""
        import json, random, torch
        random.random(); torch.rand(999)
        from tests.helpers.training import cpu_profile
        from tunepipe.schemas.manifest import ArtifactRef
        from tunepipe.schemas.sft import SFTConfig
        from tunepipe.tasks.core.artifacts import ArtifactStore
        from tunepipe.tasks.core.stage import run_stage
        from tunepipe.tasks.sft.stage import SFTStage
        config = SFTConfig.model_validate(json.loads({json.dumps(json.dumps(sft_config(assets).model_dump(mode="json")))}))
        data = ArtifactRef.model_validate(json.loads({json.dumps(assets["data"].model_dump_json())}))
        ref = run_stage(SFTStage(), config, {{"data": data}}, ArtifactStore({str(tmp_path / "there")!r}), cpu_profile())
        print(json.dumps({{"key": ref.key, "path": ref.path}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["key"] == here.key
    assert weight_files(there["path"]) == weight_files(here.path)


def test_reward_head_and_dpo_weights_do_not_depend_on_earlier_draws(tmp_path):
    assets = build_assets(tmp_path / "assets")
    pairs = data_with_pairs(assets, "pairs", quickstart_pairs())
    reward = RewardConfig.model_validate(
        {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 64,
         "min_accuracy": None,  # 2 steps: a determinism check, not a usable reward model
         "training": {"max_steps": 2, "warmup_ratio": 0.0}}
    )
    dpo = AlignConfig.model_validate(
        {"method": {"name": "dpo"}, "max_length": 64, "training": {"max_steps": 2, "warmup_ratio": 0.0},
         "heldout": {"max_examples_per_task": 0}}
    )
    results = []
    for n, store in ((0, "a"), (4321, "b")):
        draw_noise(n)
        root = ArtifactStore(tmp_path / store)
        r = run_stage(RewardStage(), reward, {"data": pairs}, root, env())
        draw_noise(n + 1)
        a = run_stage(AlignStage(), dpo, {"data": pairs, "sft": assets["sft"]}, root, env())
        results.append((r, a))
    (r1, a1), (r2, a2) = results
    assert (r1.key, a1.key) == (r2.key, a2.key)
    assert weight_files(r1.path) and weight_files(r1.path) == weight_files(r2.path)
    assert weight_files(a1.path) and weight_files(a1.path) == weight_files(a2.path)


def published_files(path: str) -> dict[str, bytes]:
    """Every file of a published artifact but its manifest (which records when it ran)."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_data_stage_publishes_the_same_bytes_in_fresh_workdirs(tmp_path):
    """report.json and validation.json included: no timings, run ids or clock times in them; the
    streaming engine publishes the same artifact."""
    from tests.stage.test_data import load_config
    from tunepipe.tasks.data.stage import DataStage

    configs = {"a": load_config(), "b": load_config(), "streamed": load_config(engine="streaming")}
    refs = [run_stage(DataStage(), config, {}, ArtifactStore(tmp_path / store), cpu_profile()) for store, config in configs.items()]
    assert refs[0].key == refs[1].key == refs[2].key
    first = published_files(refs[0].path)
    assert {"report.json", "validation.json", "train.jsonl", "rejected.jsonl"} <= first.keys()
    for ref in refs[1:]:  # the streaming engine's spill dir (.checkpoints) is not published either
        other = published_files(ref.path)
        assert first == other, [name for name in first.keys() | other.keys() if first.get(name) != other.get(name)]
    manifests = [json.loads((Path(r.path) / "manifest.json").read_text())["files"] for r in refs]
    assert manifests[0] == manifests[1] == manifests[2]
