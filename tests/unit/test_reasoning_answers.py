"""A reasoning family's answer is what follows its think block, wherever an answer is scored."""

from __future__ import annotations

import pytest

from tunepipe.tasks.align.rewards import rule_reward_func
from tunepipe.tasks.lm.encoding import final_answer, reasoning_end


@pytest.mark.parametrize("text,answer", [
    ("<think>\n\n</think>\n\npositive", "positive"),                  # Qwen3's empty block (non-thinking data)
    ("<think>\nthe user is happy\n</think>\n\n positive ", "positive"),
    ("the user is happy\n</think>\n\npositive", "positive"),            # R1-style: the prompt opened the block
    ("<think>a</think>b</think> c", "c"),                               # after the last marker, as lm-eval reads it
    ("<think>\nstill thinking when the tokens ran out", ""),            # no answer yet
    ("  plain answer\n", "plain answer"),                               # a family without reasoning tags in the text
])
def test_final_answer(text, answer):
    assert final_answer(text, "</think>") == answer


def test_without_a_marker_the_text_is_the_answer():
    assert final_answer(" <think>x</think> y ", None) == "<think>x</think> y"


def test_the_marker_comes_from_the_tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tokenizer(extra):
        raw = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizers.Whitespace()
        raw.add_tokens([AddedToken(t, special=False) for t in extra])
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")

    assert reasoning_end(tokenizer(["<think>", "</think>"])) == "</think>"
    assert reasoning_end(tokenizer([])) is None


def test_rule_rewards_score_the_answer_not_the_reasoning():
    reward = rule_reward_func("exact_match", "</think>")
    completions = [[{"role": "assistant", "content": "<think>\nhmm\n</think>\n\npositive"}], "<think>\nhmm", "positive"]
    assert reward(prompts=["p"] * 3, completions=completions, reference=["positive"] * 3) == [1.0, 0.0, 1.0]
    plain = rule_reward_func("exact_match")
    assert plain(prompts=["p"], completions=["<think></think>positive"], reference=["positive"]) == [0.0]
