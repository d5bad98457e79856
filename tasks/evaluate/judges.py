"""Who decides a pair: a rule (the task metric), the reward model, or a judge model behind an
OpenAI-compatible chat endpoint. Each returns one outcome per prompt from the candidate's side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunepipe.schemas.evaluate import JudgeEndpoint
from tunepipe.tasks.evaluate.stats import LOSS, TIE, WIN, outcome_from_difference
from tunepipe.tasks.lm import judge as shared_judge
from tunepipe.tasks.lm.judge import parse_verdict
from tunepipe.tasks.lm.pairs import render_conversation
from tunepipe.tasks.lm.reward_model import load_reward_model, score_texts


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
    model, tokenizer = load_reward_model(reward_dir, dtype)
    model = model.to(device)
    candidate = score_texts(model, tokenizer, [render_conversation(tokenizer, p.messages, p.candidate) for p in pairs])
    baseline = score_texts(model, tokenizer, [render_conversation(tokenizer, p.messages, p.baseline) for p in pairs])
    return candidate, baseline


# --------------------------------------------------------------------------------------------
# A judge model behind an OpenAI-compatible endpoint

def judge_messages(pair: Pair, first: str, second: str) -> list[dict[str, str]]:
    return shared_judge.judge_messages(pair.messages, pair.reference, first, second)


def combine(forward: str | None, backward: str | None, swapped: bool) -> str:
    """The candidate's outcome, asked first as A (`forward`) and then as B (`backward`)."""
    return {shared_judge.FIRST: WIN, shared_judge.SECOND: LOSS}.get(shared_judge.combine(forward, backward, swapped), TIE)


def endpoint_outcomes(endpoint: JudgeEndpoint, pairs: list[Pair]) -> tuple[list[str], dict[str, Any]]:
    """Outcomes from the judge model, and how many answers it gave that could not be parsed."""
    client = shared_judge.openai_client(endpoint)

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
