"""Who decides a pair: a rule (the task metric), the reward model, or a judge model behind an
OpenAI-compatible chat endpoint. Each returns one outcome per prompt from the candidate's side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tunepipe.schemas.evaluate import JudgeEndpoint
from tunepipe.tasks.evaluate.stats import LOSS, TIE, WIN, outcome_from_difference


@dataclass
class Pair:
    """One prompt's two answers, and what the judges may look at."""

    task: str
    messages: list[dict[str, str]]  # the conversation up to the answer
    reference: str
    candidate: str
    baseline: str


def rule_outcomes(candidate_scores: list[float], baseline_scores: list[float], tie_margin: float) -> list[str]:
    """The better task-metric score against the reference wins."""
    return [outcome_from_difference(c - b, tie_margin) for c, b in zip(candidate_scores, baseline_scores)]


# --------------------------------------------------------------------------------------------
# The reward model (a `reward` stage artifact)


def reward_model_scores(reward_dir: str, pairs: list[Pair], dtype: str, device: str) -> tuple[list[float], list[float]]:
    """(candidate scores, baseline scores): the reward model's scalar for each conversation with
    each answer, rendered with the reward model's own chat template (as it was trained)."""
    from tunepipe.tasks.training.pairs import render_conversation
    from tunepipe.tasks.training.reward_model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(reward_dir, dtype)
    model = model.to(device)
    candidate = score_texts(model, tokenizer, [render_conversation(tokenizer, p.messages, p.candidate) for p in pairs])
    baseline = score_texts(model, tokenizer, [render_conversation(tokenizer, p.messages, p.baseline) for p in pairs])
    return candidate, baseline


# --------------------------------------------------------------------------------------------
# A judge model behind an OpenAI-compatible endpoint

JUDGE_SYSTEM = (
    "You are a strict evaluator. Given a conversation, a reference answer and two candidate answers A and B, "
    "decide which answer is better: more correct with respect to the reference, then more helpful and concise. "
    "Reply with exactly one word: A, B, or TIE."
)
_VERDICT = re.compile(r"\b(A|B|TIE)\b", re.IGNORECASE)


def judge_messages(pair: Pair, first: str, second: str) -> list[dict[str, str]]:
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in pair.messages)
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": f"[Conversation]\n{conversation}\n\n[Reference answer]\n{pair.reference}\n\n"
            f"[Answer A]\n{first}\n\n[Answer B]\n{second}\n\nWhich is better? Reply A, B or TIE.",
        },
    ]


def parse_verdict(text: str) -> str | None:
    """"A", "B", "TIE" (the first such word), or None when the judge said none of them."""
    match = _VERDICT.search(text or "")
    return match.group(1).upper() if match else None


def combine(forward: str | None, backward: str | None, swapped: bool) -> str:
    """One outcome from the verdicts with the candidate as A (`forward`) and as B (`backward`).
    With both orders asked, a winner must win in both; anything else (and no verdict) is a tie."""
    first = {"A": WIN, "B": LOSS}.get(forward or "", TIE)
    if not swapped:
        return first
    second = {"A": LOSS, "B": WIN}.get(backward or "", TIE)
    return first if first == second else TIE


def endpoint_outcomes(endpoint: JudgeEndpoint, pairs: list[Pair]) -> tuple[list[str], dict[str, Any]]:
    """Outcomes from the judge model, and how many answers it gave that could not be parsed."""
    from tunepipe.tasks.evaluate.generation import openai_client

    client = openai_client(endpoint)

    def ask(pair: Pair, first: str, second: str) -> str | None:
        response = client.chat.completions.create(
            model=endpoint.model, messages=judge_messages(pair, first, second), temperature=0.0, max_tokens=8
        )
        return parse_verdict(response.choices[0].message.content or "")

    outcomes, verdicts = [], []
    for pair in pairs:
        forward = ask(pair, pair.candidate, pair.baseline)
        backward = ask(pair, pair.baseline, pair.candidate) if endpoint.swap_positions else None
        verdicts += [forward, backward] if endpoint.swap_positions else [forward]
        outcomes.append(combine(forward, backward, endpoint.swap_positions))
    return outcomes, {"judge_requests": len(verdicts), "judge_unparsed": verdicts.count(None)}
