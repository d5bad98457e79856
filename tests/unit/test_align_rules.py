"""Rule-based rewards and the align/reward config schemas (no models)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.reward import RewardConfig
from tunepipe.tasks.align.rewards import completion_text, rule_reward_func, triple_format


def test_triple_format_accepts_triples_only():
    assert triple_format("(Aiko, works_at, Wonka)") == 1.0
    assert triple_format("(Liam, founded, Nakatomi); (Liam, lives_in, Toronto)") == 1.0
    assert triple_format("(Liam, founded, Nakatomi) (Liam, lives_in, Toronto)") == 0.0
    assert triple_format("Aiko works at Wonka") == 0.0
    assert triple_format("(Aiko, works at, Wonka)") == 0.0  # relations are snake_case names
    assert triple_format("") == 0.0


def test_rule_reward_funcs_score_trl_completions_against_the_reference():
    f1 = rule_reward_func("token_f1")
    exact = rule_reward_func("exact_match")
    completions = [[{"role": "assistant", "content": " one two "}], [{"role": "assistant", "content": "red"}], "seven"]
    references = ["one two three", "red", "six"]
    assert exact([], completions, reference=references) == [0.0, 1.0, 0.0]
    assert f1([], completions, reference=references) == pytest.approx([0.8, 1.0, 0.0])
    assert f1.__name__ == "token_f1"  # TRL logs rewards/<name>
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]) == "a"


def test_align_method_union_and_knobs():
    config = AlignConfig.model_validate({"method": "dpo"})
    assert config.method.name == "dpo" and config.method.loss_type == ["sigmoid"]
    assert AlignConfig.model_validate({"method": {"name": "dpo", "loss_type": "ipo", "beta": 0.3}}).method.loss_type == ["ipo"]
    with pytest.raises(ValidationError, match="loss_type"):
        AlignConfig.model_validate({"method": {"name": "dpo", "loss_type": "not_a_loss"}})
    with pytest.raises(ValidationError, match="cliprange"):
        AlignConfig.model_validate({"method": {"name": "dpo", "cliprange": 0.2}})  # a PPO knob under dpo
    with pytest.raises(ValidationError, match="reward_weights has 1 entries for 2 rewards"):
        AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["token_f1", "reward_model"], "reward_weights": [1.0]}})
    with pytest.raises(ValidationError, match="num_generations"):
        AlignConfig.model_validate({"method": {"name": "rloo", "num_generations": 1}})


def test_which_settings_need_a_reward_model():
    needs = lambda c: AlignConfig.model_validate(c).needs_reward_model()
    assert needs({"method": "ppo"})
    assert needs({"method": {"name": "grpo", "rewards": ["reward_model"]}})
    assert not needs({"method": {"name": "grpo", "rewards": ["exact_match"]}})
    assert not needs({"method": "dpo"})
    assert needs({"method": "dpo", "preferences": {"source": "on_policy", "scorer": "reward_model"}})
    assert not needs({"method": "kto", "preferences": {"source": "on_policy", "scorer": "rule"}})


def test_reward_config():
    assert RewardConfig.model_validate({"method": "full"}).method.name == "full"
    with pytest.raises(ValidationError):
        RewardConfig.model_validate({"method": "ia3"})  # a reward model trains lora, qlora or full
    with pytest.raises(ValidationError, match="tasks is empty"):
        RewardConfig.model_validate({"tasks": []})
