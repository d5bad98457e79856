"""Held-out scoring used by the sft stage's learning check."""

from __future__ import annotations

import pytest

from tunepipe.tasks.lm.metrics import (
    TaskScorer,
    contains_answer,
    exact_match,
    extract_label,
    normalise,
    score,
    token_f1,
)
from tunepipe.tasks.lm.generation import heldout_examples


def test_whitespace_normalisation_keeps_case_and_punctuation():
    assert exact_match("  (Alice, works_at,  Acme) ", "(Alice, works_at, Acme)", "whitespace") == 1.0
    assert exact_match("(alice, works_at, Acme)", "(Alice, works_at, Acme)", "whitespace") == 0.0


def test_squad_normalisation_is_the_default():
    # SQuAD's normalize_answer: lowercase, punctuation out, articles a/an/the out, whitespace collapsed.
    assert normalise("The  Review is, POSITIVE!") == "review is positive"
    assert normalise("an apple a day") == "apple day"
    assert normalise("theatre") == "theatre"  # only whole-word articles
    assert exact_match("(alice, works_at, Acme)", "(Alice, works_at, Acme)") == 1.0
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0
    # whitespace normalisation keeps the punctuation tokens, so the same answer gets no credit there
    assert token_f1("The review is positive.", "positive", "whitespace") == 0.0
    assert token_f1("The review is positive.", "positive") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_token_f1_by_hand():
    # pred tokens: x b c d ; ref tokens: x b e ; common 2 → P=2/4, R=2/3, F1=2PR/(P+R)=4/7
    assert token_f1("x b c d", "x b e") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0
    assert token_f1("x x b", "x b b") == pytest.approx(2 / 3)
    # "a" is an article: dropped from both sides before counting (P=1/3, R=1/2)
    assert token_f1("a b c d", "a b e") == pytest.approx(0.4)


def test_score_averages():
    assert score(["x", "b c", "z"], ["x", "b d", "y"]) == {"exact_match": round(1 / 3, 4), "token_f1": 0.5, "n": 3}


def test_label_extraction_reads_the_one_label_an_answer_names():
    labels = ("positive", "negative", "neutral")
    assert extract_label("The review is positive.", labels) == "positive"
    assert extract_label("NEGATIVE", labels) == "negative"
    # naming two labels, or none, is not read as either
    assert extract_label("It is positive, not negative.", labels) == "It is positive, not negative."
    assert extract_label("I cannot tell.", labels) == "I cannot tell."
    # whole words only: "positively" is not the label
    assert extract_label("positively great", labels) == "positively great"
    # a label inside a longer label yields to the longer one
    assert extract_label("Very positive indeed", ("positive", "very positive")) == "very positive"
    scorer = TaskScorer(labels=labels)
    assert scorer.exact_match("The review is positive.", "positive") == 1.0
    assert scorer.token_f1("The review is positive.", "positive") == 1.0
    assert scorer.exact_match("The review is negative.", "positive") == 0.0
    assert TaskScorer().exact_match("The review is positive.", "positive") == 0.0


def test_contains_answer_accepts_any_alias_as_whole_words():
    assert contains_answer("The capital of France is Paris.", ["Paris"]) == 1.0
    assert contains_answer("It is four.", ["4", "four"]) == 1.0
    assert contains_answer("Parisian food", ["Paris"]) == 0.0
    assert contains_answer("Luxembourg", "Paris") == 0.0


def test_heldout_examples_caps_per_task(tmp_path):
    lines = [f'{{"id": "{i}", "task": "{"t1" if i % 2 else "t2"}", "instruction": "q{i}", "input": "", "output": "a{i}"}}' for i in range(10)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    picked = heldout_examples(tmp_path, ["t1"], 3)
    assert list(picked) == ["t1"] and [r["id"] for r in picked["t1"]] == ["1", "3", "5"]
