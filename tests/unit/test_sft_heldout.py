"""Held-out scoring used by the sft stage's learning check."""

from __future__ import annotations

import pytest

from tunepipe.tasks.training.metrics import exact_match, score, token_f1
from tunepipe.tasks.training.generation import heldout_examples


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  (Alice, works_at,  Acme) ", "(Alice, works_at, Acme)") == 1.0
    assert exact_match("(alice, works_at, Acme)", "(Alice, works_at, Acme)") == 0.0


def test_token_f1_by_hand():
    # pred tokens: a b c d ; ref tokens: a b e ; common 2 → P=2/4, R=2/3, F1=2PR/(P+R)=4/7
    assert token_f1("a b c d", "a b e") == pytest.approx(4 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)


def test_score_averages():
    assert score(["a", "b c", "z"], ["a", "b d", "y"]) == {"exact_match": round(1 / 3, 4), "token_f1": 0.5, "n": 3}


def test_heldout_examples_caps_per_task(tmp_path):
    lines = [f'{{"id": "{i}", "task": "{"t1" if i % 2 else "t2"}", "instruction": "q{i}", "input": "", "output": "a{i}"}}' for i in range(10)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    picked = heldout_examples(tmp_path, ["t1"], 3)
    assert list(picked) == ["t1"] and [r["id"] for r in picked["t1"]] == ["1", "3", "5"]
