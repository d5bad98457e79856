"""Reward functions: rule-based (verifiable, against the record's reference answer) and the
learned reward model (a `reward` stage artifact).

Rules reuse the held-out scoring of the sft stage (`exact_match`, `token_f1`), plus a format
rule for the quickstart's relation triples `(a, rel, b); (c, rel, d)`. Each rule is also offered
as a TRL reward function (`reward_funcs` of GRPO/RLOO: called with the prompts, the completions
and the dataset's other columns, here `reference`).
"""


from __future__ import annotations

import re
from typing import Any, Callable

from tunepipe.tasks.training.metrics import exact_match, token_f1
from tunepipe.tasks.training.reward_model import completion_text

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



def rule_reward_func(name: str) -> Callable[..., list[float]]:
    """A TRL reward function scoring completions with rule `name` against the `reference` column."""
    rule = RULES[name]

    def reward(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        return [rule(completion_text(c).strip(), ref) for c, ref in zip(completions, reference)]

    reward.__name__ = name  # TRL logs each reward function's mean under `rewards/<name>/mean`
    return reward
