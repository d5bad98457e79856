"""The reward and pretrain stages prove their own result before they publish: each self-check, with
a planted failure.

reward: steps not all run, a NaN or constant loss, a model whose scores never changed (no update
reached the weights). pretrain: blocks without a labeled token, steps not all run, a NaN loss.
Each failure names its check; the passing runs record every check in the manifest's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.pretrain.stage import PretrainStage
from tunepipe.tasks.reward.stage import RewardStage
from tests.helpers.alignment import quickstart_pairs
from tests.helpers.training import build_tiny_model, cpu_profile, plant_loss, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("self-checks-rp")
    data = write_data_artifact(root / "data")
    pairs = [p for p in quickstart_pairs() if p["split"] == "train"][:24] + [p for p in quickstart_pairs() if p["split"] == "test"][:8]
    (Path(data.path) / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"model": build_tiny_model(root / "llama"), "data": data}


def _metrics(ref) -> dict:
    return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def _reward(assets, tmp_path, **training):
    config = RewardConfig.model_validate({
        "model": str(assets["model"]), "method": "full", "max_length": 128,
        "training": {"max_steps": 4, "learning_rate": 3e-3, "warmup_ratio": 0.0, "save_steps": 100, **training},
    })
    return run_stage(RewardStage(), config, {"data": assets["data"]}, ArtifactStore(tmp_path / "artifacts"), cpu_profile(per_device_batch_size=8))


def _pretrain(assets, tmp_path, **training):
    config = PretrainConfig.model_validate({
        "model": str(assets["model"]), "method": "full", "max_length": 24, "validation_fraction": 0.0,
        "training": {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0, "save_steps": 100, **training},
    })
    return run_stage(PretrainStage(), config, {"data": assets["data"]}, ArtifactStore(tmp_path / "artifacts"), cpu_profile(per_device_batch_size=2))


def _stop_after_two_steps(monkeypatch):
    from transformers import TrainerCallback

    from tunepipe.tasks.training import trainer as trainer_module

    class StopEarly(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    original = trainer_module.make_callbacks
    monkeypatch.setattr(trainer_module, "make_callbacks", lambda *a, **k: [*original(*a, **k), StopEarly()])


# ---------------------------------------------------------------------------------------- reward


def test_reward_passing_run_records_every_check(assets, tmp_path):
    m = _metrics(_reward(assets, tmp_path))
    checks = m["checks"]
    assert checks["steps"] == {"passed": True, "global_step": 4, "requested": 4}
    assert checks["loss"]["passed"] and checks["loss"]["finite"] and checks["loss"]["moved"]
    scores = checks["reward_scores"]
    assert scores["passed"] and scores["max_score_change"] > 0 and scores["on"] == "heldout" and scores["pairs"] == 8
    # the accuracy the check saw is the stage's reported held-out accuracy, before and after
    assert (scores["accuracy_before"], scores["accuracy_after"]) == (m["heldout_accuracy_before"], m["heldout_accuracy"])


def test_reward_steps_that_did_not_all_run(assets, tmp_path, monkeypatch):
    _stop_after_two_steps(monkeypatch)
    with pytest.raises(StageFailed, match=r"self-check steps failed: reward ran 2 optimizer steps of the 4 requested"):
        _reward(assets, tmp_path)


@pytest.mark.parametrize("planted, reason", [
    (lambda loss: loss * float("nan"), "not finite"),
    (lambda loss: loss * 0 + 1.0, "constant"),
])
def test_reward_loss_nan_or_never_moving(assets, tmp_path, monkeypatch, planted, reason):
    from trl import RewardTrainer

    plant_loss(monkeypatch, RewardTrainer, planted)
    with pytest.raises(StageFailed, match=f"self-check loss failed: reward: the loss is {reason}"):
        _reward(assets, tmp_path)


def test_reward_model_whose_scores_never_changed(assets, tmp_path, monkeypatch):
    """Every step computes its loss (which varies batch to batch, so the loss check passes) but no gradient
    reaches the weights: the published model would score pairs as the untrained one did."""
    from trl import RewardTrainer

    def training_step(self, model, inputs, num_items_in_batch=None):
        with torch.no_grad():
            return self.compute_loss(model, inputs).detach()

    monkeypatch.setattr(RewardTrainer, "training_step", training_step)
    with pytest.raises(StageFailed, match=r"self-check reward_scores failed: reward: the trained model scores the 8 heldout pairs "
                                          r"exactly as the untrained one did"):
        _reward(assets, tmp_path)


def test_reward_scores_check_on_training_pairs_when_none_is_held_out():
    from tunepipe.tasks.lm.checks import reward_scores_check

    same = reward_scores_check(([1.0, 2.0], [0.5, 3.0]), ([1.0, 2.0], [0.5, 3.0]), "train")
    moved = reward_scores_check(([1.0, 2.0], [0.5, 3.0]), ([1.0, 2.5], [0.5, 3.0]), "train")
    assert not same["passed"] and same["max_score_change"] == 0.0
    assert moved["passed"] and moved["max_score_change"] == 0.5 and (moved["accuracy_before"], moved["accuracy_after"]) == (0.5, 0.5)
    assert not reward_scores_check(([], []), ([], []), "train")["passed"]  # nothing scored proves nothing


# ---------------------------------------------------------------------------------------- pretrain


def test_pretrain_passing_run_records_every_check(assets, tmp_path):
    checks = _metrics(_pretrain(assets, tmp_path))["checks"]
    assert checks["steps"] == {"passed": True, "global_step": 3, "requested": 3}
    assert checks["loss"]["passed"] and checks["loss"]["finite"] and checks["loss"]["moved"]
    labels = checks["labels"]
    assert labels["passed"] and labels["empty_rows"] == 0 and labels["rows"] > 0 and labels["labeled_tokens"] > labels["rows"]


def test_pretrain_blocks_without_labels(assets, tmp_path, monkeypatch):
    from tunepipe.tasks.training import trainer as trainer_module

    original = trainer_module.build_trainer

    def build_trainer(**kwargs):
        trainer = original(**kwargs)
        collate = trainer.data_collator

        def unlabeled(rows):
            batch = collate(rows)
            batch["labels"] = torch.full_like(batch["labels"], -100)
            return batch

        trainer.data_collator = unlabeled
        return trainer

    monkeypatch.setattr(trainer_module, "build_trainer", build_trainer)
    with pytest.raises(StageFailed, match=r"self-check labels failed: pretrain: \d+ of the first \d+ training blocks have no labeled token"):
        _pretrain(assets, tmp_path)


def test_pretrain_steps_that_did_not_all_run(assets, tmp_path, monkeypatch):
    _stop_after_two_steps(monkeypatch)
    with pytest.raises(StageFailed, match=r"self-check steps failed: pretrain ran 2 optimizer steps of the 3 requested"):
        _pretrain(assets, tmp_path)


def test_pretrain_loss_not_finite(assets, tmp_path, monkeypatch):
    from trl import SFTTrainer

    plant_loss(monkeypatch, SFTTrainer, lambda loss: loss * float("nan"))
    with pytest.raises(StageFailed, match=r"self-check loss failed: pretrain: the loss is not finite"):
        _pretrain(assets, tmp_path)
