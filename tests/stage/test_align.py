"""The align stage on the tiny model: DPO raises held-out preference accuracy above the SFT
policy's, PPO raises the reward-model score with bounded KL, GRPO trains on rule + reward-model rewards;
the adapter continues the SFT adapter (one adapter, loadable on the SFT base); caching by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.reward.stage import RewardStage
from tunepipe.tasks.core.stage import StageFailed, identify, run_stage
from tests.helpers.alignment import build_assets, data_with_pairs, env, pairs_against_sft

torch.set_num_threads(1)

HELDOUT = {"max_examples_per_task": 4, "max_new_tokens": 8, "batch_size": 8}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    assets = build_assets(tmp_path_factory.mktemp("align"))
    assets["pairs_data"] = data_with_pairs(assets, "data-pairs", pairs_against_sft(assets))
    return assets


@pytest.fixture(scope="module")
def reward(assets):
    config = RewardConfig.model_validate(
        {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 64,
         "training": {"max_steps": 6, "learning_rate": 1e-2, "warmup_ratio": 0.0}}
    )
    ref = run_stage(RewardStage(), config, {"data": assets["pairs_data"]}, assets["store"], env())
    adapter_config = json.loads((Path(ref.path) / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    return ref


def _align(assets, config: dict, *, reward=None, data=None):
    inputs = {"data": data or assets["pairs_data"], "sft": assets["sft"], **({"reward": reward} if reward else {})}
    config = AlignConfig.model_validate({"max_length": 64, "heldout": HELDOUT, **config})
    ref = run_stage(AlignStage(), config, inputs, assets["store"], env())
    return ref, json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


def _loads_on_sft_base(assets, ref) -> None:
    """The aligned adapter is one adapter of the SFT adapter's kind, loadable on the SFT base."""
    from peft import PeftModel

    from tunepipe.tasks.lm.modeling import load_model

    root = Path(ref.path)
    outputs = json.loads((root / "outputs.json").read_text())
    sft_outputs = json.loads((Path(assets["sft"].path) / "outputs.json").read_text())
    assert outputs["kind"] == "adapter" and outputs["paths"] == {"all": "adapter"}
    assert outputs["base_model"] == sft_outputs["base_model"]
    sft_config = json.loads((Path(assets["sft"].path) / "adapter" / "adapter_config.json").read_text())
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == sft_config["r"] and sorted(config["target_modules"]) == sorted(sft_config["target_modules"])
    assert not (root / "adapter" / "ref").exists(), "the reference copy must not be saved"
    model = PeftModel.from_pretrained(load_model(outputs["base_model"]), str(root / "adapter"))
    assert list(model.peft_config) == ["default"]
    assert (root / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and (root / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_dpo_raises_heldout_preference_accuracy_above_sft(assets):
    ref, m = _align(
        assets,
        {"method": {"name": "dpo", "beta": 0.5, "loss_type": "sigmoid"},
         "training": {"max_steps": 12, "learning_rate": 3e-2, "warmup_ratio": 0.0}},
    )
    prefs = m["heldout"]["all"]["preferences"]
    assert prefs["n"] == 10
    # The pairs prefer what the SFT policy finds less likely: DPO must turn that around.
    assert prefs["sft_accuracy"] < 0.5 < prefs["aligned_accuracy"], prefs
    assert prefs["implicit_reward_accuracy"] > 0.5 and prefs["implicit_reward_margin"] > 0
    steps = m["step_metrics"]["all"]
    assert len(steps["loss"]) == 12 and {"reward_chosen", "reward_rejected", "margin", "accuracy"} <= set(steps)
    assert steps["margin"][-1]["value"] > steps["margin"][0]["value"]
    task = m["heldout"]["all"]["task"]
    assert task["task_metric_within_tolerance"] == (task["task_metric_drop"] <= 0.05)
    assert m["task_metric_within_tolerance"] is task["task_metric_within_tolerance"]
    assert task["kl_to_sft"] > 0
    _loads_on_sft_base(assets, ref)


def test_ppo_raises_reward_with_bounded_kl(assets, reward):
    ref, m = _align(
        assets,
        {"method": {"name": "ppo", "kl_coef": 0.05, "response_length": 8, "num_ppo_epochs": 2, "temperature": 1.0},
         "training": {"max_steps": 12, "learning_rate": 5e-3, "warmup_ratio": 0.0}},
        reward=reward,
    )
    # 12 updates, not 6: with the policy now seeded from training.seed, 6 updates lowered the
    # held-out reward (-0.98 vs SFT -0.80); 12 raised it for seeds 42 and 7 at lr 1e-2 and 5e-3.
    # lr 5e-3, not 1e-2: at 1e-2 with seed 42 the outcome hangs on float rounding. PPO's rollouts are
    # sampled, so a last-bit difference in a matmul changes which tokens are drawn and the run takes
    # another path. On an AVX2-only CPU the policy's greedy answer collapsed to "tive" repeated by
    # update 6 and stayed there (-0.9849 at 6, 12 and 20 updates). ATEN_CPU_CAPABILITY=default on that
    # machine gave -0.8207, with the same packages and the same SFT score. On AVX2, 5e-3 raised it for
    # seeds 42 (-0.64) and 7 (-0.22), as did 1e-2 with seed 7 and 3e-3 with seed 42. 5e-3 with seed 42
    # also passes every assertion here on ATEN_CPU_CAPABILITY=default kernels.
    task = m["heldout"]["all"]["task"]
    assert task["aligned_reward_mean"] > task["sft_reward_mean"], task
    assert 0 < task["kl_to_sft"] < 1.0
    assert m["win_rate"]["all"] > 0.5
    steps = m["step_metrics"]["all"]
    assert {"reward_mean", "kl", "value_loss", "clip_fraction"} <= set(steps) and len(steps["kl"]) == 12
    assert max(abs(p["value"]) for p in steps["kl"]) < 1.0
    # PPO cannot look idle: its loss (policy + vf_coef * value, as TRL optimises it) per update,
    # the rollouts' reward spread, and the value model in the trainable count.
    assert len(m["loss_history"]["all"]) == 12 and m["train_loss"]["all"] is not None
    assert m["train_loss"]["all"] == pytest.approx(sum(p["loss"] for p in m["loss_history"]["all"]) / 12, abs=1e-5)
    assert len(steps["reward_std"]) == 12 and all(p["value"] >= 0 for p in steps["reward_std"])
    by_model = m["trainable_parameters_by_model"]
    assert by_model["value_model"] > 0 and m["trainable_parameters"] == by_model["policy"] + by_model["value_model"]
    assert all(c["passed"] for c in m["checks"]["all"].values()), m["checks"]
    assert m["verdict"]["all"]["objective"] == "held-out reward-model score"
    assert m["verdict"]["all"]["better_than_sft"] == bool(task["task_metric_within_tolerance"])  # the reward rose (above)
    _loads_on_sft_base(assets, ref)


def test_ppo_without_reward_model_fails_clearly(assets):
    with pytest.raises(StageFailed, match="needs a reward model.*add a `reward:` section"):
        _align(assets, {"method": "ppo"})


def test_grpo_with_rule_and_reward_model_rewards(assets, reward):
    # Rule rewards alone give this tiny policy no signal (every sample scores 0, so every group
    # has zero variance: tests/stage/test_align_checks.py shows the stage failing on exactly that);
    # the reward model's scores differ between samples, so the rules ride along with a real gradient.
    ref, m = _align(
        assets,
        {"method": {"name": "grpo", "num_generations": 4, "max_completion_length": 8, "rewards": ["token_f1", "triple_format", "reward_model"]},
         "max_prompts": 8, "training": {"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0}},
        reward=reward,
    )
    steps = m["step_metrics"]["all"]
    assert len(steps["reward_mean"]) == 2 and "reward_std" in steps and "kl" in steps
    assert {"reward_token_f1_mean", "reward_triple_format_mean", "reward_reward_model_mean", "frac_reward_zero_std"} <= set(steps)
    assert m["global_step"] == {"all": 2}
    assert all(c["passed"] for c in m["checks"]["all"].values()), m["checks"]
    _loads_on_sft_base(assets, ref)


def test_align_is_cached_and_beta_changes_only_its_key(assets):
    config = {"method": {"name": "dpo", "beta": 0.5, "loss_type": "sigmoid"},
              "training": {"max_steps": 12, "learning_rate": 3e-2, "warmup_ratio": 0.0}}
    first, _ = _align(assets, config)  # trained by the DPO test with this exact config: a cache hit
    assert first.cached
    inputs = {"data": assets["pairs_data"], "sft": assets["sft"]}
    variants = (config, {**config, "method": {**config["method"], "beta": 0.2}}, {**config, "method": {"name": "kto", "beta": 0.5}})
    keys = {
        identify(AlignStage(), AlignConfig.model_validate({"max_length": 64, "heldout": HELDOUT, **c}), inputs, env()).key
        for c in variants
    }
    assert len(keys) == 3  # beta and method enter the key; the sft and data inputs are unchanged
