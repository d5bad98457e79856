"""The reward stage: a reward model on the quickstart's real preference pairs beats chance on
held-out pairs; the artifact reloads to the same scores; bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.lm.pairs import is_heldout
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.reward.stage import RewardStage
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tests.helpers.alignment import quickstart_pairs
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)

# Measured on this split (60 held-out pairs): accuracy 0.42 with the untrained head → 0.72 after
# these 30 full fine-tuning steps, about 6 s on 2 cores (LoRA r=8: 0.67 after 20 steps at 3e-3).
QUICKSTART_SETTING = {"method": "full", "max_length": 96,
                      "training": {"max_steps": 30, "learning_rate": 3e-3, "warmup_ratio": 0.0}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    data = write_data_artifact(root / "data")
    pairs = quickstart_pairs()
    (Path(data.path) / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"root": root, "model": build_tiny_model(root / "llama"), "data": data, "pairs": pairs,
            "store": ArtifactStore(root / "artifacts")}


def test_quickstart_reward_model_beats_chance_on_heldout_pairs(assets):
    config = RewardConfig.model_validate({"model": str(assets["model"]), **QUICKSTART_SETTING})
    env = cpu_profile(per_device_batch_size=16)
    ref = run_stage(RewardStage(), config, {"data": assets["data"]}, assets["store"], env)
    root = Path(ref.path)
    m = json.loads((root / "manifest.json").read_text())["metrics"]
    assert m["heldout_pairs"] == sum(p["split"] == "test" for p in assets["pairs"]) == 60
    assert m["train_pairs"] == 241 and m["global_step"] == 30
    assert m["heldout_accuracy"] >= 0.65 and m["heldout_accuracy"] > m["heldout_accuracy_before"]
    assert len(m["loss_history"]) == 30 and {"train_accuracy", "train_margin"} <= set(m["step_metrics"])
    assert m["min_accuracy"] == 0.6 and 0 <= m["heldout_ece"] <= 1 and 0 < m["heldout_brier"] < 0.25

    outputs = json.loads((root / "outputs.json").read_text())
    assert outputs == {"kind": "model", "method": "full", "base_model": str(assets["model"]), "paths": {"all": "model"}}
    assert json.loads((root / "model" / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert (root / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and (root / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    # The published reward model scores the held-out pairs as training ended.
    from tunepipe.tasks.lm.reward_model import load_reward_model, pairwise_accuracy

    model, tokenizer = load_reward_model(root)
    heldout = [p for p in assets["pairs"] if is_heldout(p, 0.1)]
    assert pairwise_accuracy(model, tokenizer, heldout)["accuracy"] == m["heldout_accuracy"]
    assert run_stage(RewardStage(), config, {"data": assets["data"]}, assets["store"], env).cached


def test_pairs_without_split_are_held_out_by_prompt_hash():
    pair = {"prompt": "Extract the relation triples from the sentence.\n\nAiko works at Wonka.", "chosen": "a", "rejected": "b"}
    assert is_heldout({**pair, "split": "test"}, 0.1) and not is_heldout({**pair, "split": "train"}, 0.9)
    decisions = [is_heldout({**pair, "prompt": f"prompt {i}"}, 0.2) for i in range(1000)]
    assert decisions == [is_heldout({**pair, "prompt": f"prompt {i}"}, 0.2) for i in range(1000)]  # stable
    assert 150 < sum(decisions) < 250


def test_missing_preferences_fail_naming_the_fix(assets, tmp_path):
    data = write_data_artifact(tmp_path / "data-no-prefs")
    config = RewardConfig.model_validate({"model": str(assets["model"])})
    with pytest.raises(StageFailed, match="preferences.jsonl does not exist: add a `format: preference` source"):
        run_stage(RewardStage(), config, {"data": data}, ArtifactStore(tmp_path / "a"), cpu_profile())
    with pytest.raises(StageFailed, match=r"no preference pairs of tasks \['nope'\].*tasks present: \['sentiment', 'triples'\]"):
        run_stage(RewardStage(), RewardConfig.model_validate({"model": str(assets["model"]), "tasks": ["nope"]}),
                  {"data": assets["data"]}, ArtifactStore(tmp_path / "b"), cpu_profile())


def test_reward_model_below_its_minimum_accuracy_is_not_published(assets):
    config = RewardConfig.model_validate(
        {"model": str(assets["model"]), **QUICKSTART_SETTING, "min_accuracy": 0.99,
         "training": {"max_steps": 2, "learning_rate": 3e-3, "warmup_ratio": 0.0}}
    )
    with pytest.raises(StageFailed) as failure:
        run_stage(RewardStage(), config, {"data": assets["data"]}, assets["store"], cpu_profile(per_device_batch_size=16))
    message = str(failure.value)
    assert message.startswith("reward: held-out pairwise accuracy ") and "(n=60; ECE " in message, message
    assert "is below reward.min_accuracy 0.99: a policy optimised against this reward model" in message
    accuracy = float(message.split("accuracy ")[1].split(" ")[0])
    assert accuracy < 0.99
