"""Reward functions: rule-based (verifiable, against the record's reference answer) and the
learned reward model (a `reward` stage artifact), and an AI judge (RLAIF, `judge_reward_func`).

Rules reuse the held-out scoring of the sft stage (`exact_match`, `token_f1`), plus a format
rule for the quickstart's relation triples `(a, rel, b); (c, rel, d)`. Each rule is also offered
as a TRL reward function (`reward_funcs` of GRPO/RLOO: called with the prompts, the completions
and the dataset's other columns, here `reference`).
"""


from __future__ import annotations

import re
from typing import Any, Callable

from tunepipe.tasks.lm.encoding import final_answer
from tunepipe.tasks.lm.metrics import exact_match, token_f1
from tunepipe.tasks.lm.reward_model import completion_text

_TRIPLE = re.compile(r"\(\s*[^(),;]+?\s*,\s*[a-z_]+\s*,\s*[^(),;]+?\s*\)")


def triple_format(prediction: str, reference: str | None = None) -> float:
    """1.0 when the answer is one or more `(subject, relation, object)` triples joined by `; `.

    The reference is not used: the rule checks the shape, not the content.
    """
    parts = [p.strip() for p in prediction.strip().split(";")]
    return float(bool(parts) and all(_TRIPLE.fullmatch(p) for p in parts))


RULES: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "triple_format": triple_format,
}



def rule_reward_func(name: str, think_end: str | None = None) -> Callable[..., list[float]]:
    """A TRL reward function scoring completions with rule `name` against the `reference` column; a
    reasoning family's think block (before `think_end`) is not scored, only the answer after it."""
    rule = RULES[name]

    def reward(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        return [rule(final_answer(completion_text(c), think_end), ref) for c, ref in zip(completions, reference)]

    reward.__name__ = name  # TRL logs each reward function's mean under `rewards/<name>/mean`
    return reward


def judge_reward_func(judge: Any, think_end: str | None = None) -> Callable[..., list[float]]:
    """RLAIF as a TRL reward function: the completions of one prompt (GRPO/RLOO's group, which TRL
    passes as consecutive rows with the same prompt) are compared pairwise by the AI judge
    (`tasks/lm/judge.CachedJudge`, both orders); a completion's reward is its share of
    comparisons won, ties counting half, in [0, 1]."""

    def reward(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(repr(prompt), []).append(index)
        scores = [0.0] * len(completions)
        for rows in groups.values():
            prompt = prompts[rows[0]]
            conversation = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            texts = [final_answer(completion_text(completions[i]), think_end) for i in rows]
            for i, score in zip(rows, judge.tournament(conversation, reference[rows[0]], texts)):
                scores[i] = score
        return scores

    reward.__name__ = "judge"
    return reward
