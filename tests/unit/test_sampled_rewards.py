"""Held-out rewards of sampled answers (what grpo/rloo maximise), beside the greedy answers' rewards."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tunepipe.schemas.align import AlignConfig
from tunepipe.tasks.align.evaluation import sampled_rule_rewards, verdict
from tunepipe.tasks.training.generation import sampled_answers


@pytest.fixture(scope="module")
def tiny():
    """Two different tiny Llamas over one byte-level BPE tokenizer (no hub)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["Alice works at Acme in Paris.", "Bruno works at Globex in Lima."] * 20,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    models_ = {}
    for name, seed in (("sft", 0), ("aligned", 1)):
        torch.manual_seed(seed)
        models_[name] = LlamaForCausalLM(cfg).eval()
    return tok, models_


class Pair:
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
    from tunepipe.tasks.training.metrics import token_f1

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
