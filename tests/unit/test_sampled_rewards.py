"""Held-out rewards of sampled answers (what grpo/rloo maximise), beside the greedy answers' rewards."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.evaluation import sampled_rule_rewards, verdict
from tunepipe.tasks.lm.generation import sampled_answers
from tests.helpers.training import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tests' tiny Llama as the SFT policy, and a perturbed copy of it as the aligned one (no hub)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    policies = {which: AutoModelForCausalLM.from_pretrained(path).eval() for which in ("sft", "aligned")}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for parameter in policies["aligned"].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return AutoTokenizer.from_pretrained(path), policies


class Pair:
    """PolicyPair's interface (`use(which)` yields that policy) over two models in memory."""

    def __init__(self, models_):
        self.models = models_

    @contextmanager
    def use(self, which):
        yield self.models[which]


def test_sampled_answers_are_seeded_by_their_argument_alone(tiny):
    import torch

    tok, models_ = tiny
    prompts = ["Alice works at", "Bruno works", "in Paris."]
    draw = lambda seed: sampled_answers(models_["sft"], tok, prompts, samples=3, temperature=1.0, max_new_tokens=6, batch_size=2, seed=seed)
    first = draw(7)
    torch.rand(100)  # what the process drew before must not matter
    state = torch.random.get_rng_state()
    assert draw(7) == first
    assert torch.equal(torch.random.get_rng_state(), state)  # nor is the process's own stream moved by the draws
    assert [len(group) for group in first] == [3, 3, 3]
    assert draw(8) != first  # a real draw: another seed gives other samples
    assert len({answer for group in first for answer in group}) > 1


def test_sampled_rule_rewards_score_every_sample_of_both_policies(tiny):
    tok, models_ = tiny
    config = AlignConfig.model_validate({
        "method": {"name": "grpo", "rewards": ["token_f1", "exact_match"], "temperature": 0.9},
        "heldout": {"samples_per_prompt": 2, "max_new_tokens": 5, "batch_size": 4},
        "training": {"seed": 3},
    })
    prompts, references = ["Alice works at", "Bruno works"], ["Acme", "at Globex"]
    out = sampled_rule_rewards(Pair(models_), tok, prompts, references, config, ["token_f1", "exact_match"])
    assert out["sampling"] == {"samples_per_prompt": 2, "temperature": 0.9}
    # Recomputed by hand from the same seeded draws.
    from tunepipe.tasks.lm.metrics import token_f1

    for which in ("sft", "aligned"):
        groups = sampled_answers(models_[which], tok, prompts, samples=2, temperature=0.9, max_new_tokens=5, batch_size=4, seed=3)
        values = [token_f1(a, r) for g, r in zip(groups, references) for a in g]
        assert out["token_f1"][which] == round(sum(values) / 4, 4)
        assert 0.0 <= out["exact_match"][which] <= 1.0


def test_a_run_that_only_sharpened_its_samples_is_not_better_and_the_verdict_says_so():
    config = AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["token_f1", "triple_format"], "reward_weights": [1.0, 0.5]}})
    task = {
        "task_metric_within_tolerance": True, "kl_to_sft": 0.1,
        "sft": {"exact_match": 0.0, "token_f1": 0.39}, "aligned": {"exact_match": 0.0, "token_f1": 0.38},
        "rule_rewards": {"token_f1": {"sft": 0.39, "aligned": 0.38}, "triple_format": {"sft": 1.0, "aligned": 1.0}},
        "sampled_rule_rewards": {"token_f1": {"sft": 0.2, "aligned": 0.3}, "triple_format": {"sft": 0.8, "aligned": 1.0},
                                 "sampling": {"samples_per_prompt": 4, "temperature": 0.7}},
    }
    v = verdict(config, task, {})
    assert v["better_than_sft"] is False
    assert v["sampled_objective"] == {"objective": "sampled reward (token_f1 + triple_format, temperature 0.7)", "sft": 0.6, "aligned": 0.8}
    assert "did not rise (0.89 -> 0.88) on greedy answers" in v["reason"] and "(0.6 -> 0.8)" in v["reason"]
    # Without the sampled measurement the verdict is what it was.
    del task["sampled_rule_rewards"]
    plain = verdict(config, task, {})
    assert "sampled_objective" not in plain and plain["reason"] == "not better: held-out reward (token_f1 + triple_format) did not rise (0.89 -> 0.88)"
