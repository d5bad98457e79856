"""The learned reward model as a scorer: loading a `reward` stage artifact, scoring texts,
pairwise accuracy on preference pairs, and a TRL reward function over it.

Shared by the reward stage (its own held-out accuracy), align (PPO/GRPO rewards, on-policy
pair scoring) and evaluate (the reward-model judge).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from tunepipe.schemas.handoffs import ModelOutputs
from tunepipe.tasks.core.handoff import read_handoff
from tunepipe.tasks.lm.modeling import load_tokenizer, torch_dtype
from tunepipe.tasks.lm.pairs import pair_prompt, render_conversation


def load_reward_model(reward_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(sequence-classification model, tokenizer) of a reward artifact; an adapter is merged into
    its base so the result is a plain model (PPO's `get_reward` needs `.score` and the backbone)."""

    from transformers import AutoModelForSequenceClassification

    root = Path(reward_dir)
    outputs = read_handoff(root, ModelOutputs, reader="reward model")
    path = root / outputs.paths["all"]
    tokenizer = load_tokenizer(str(path))
    if outputs.kind == "model":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype(dtype))
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(outputs.base_model, num_labels=1, dtype=torch_dtype(dtype))
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    model.config.pad_token_id = tokenizer.pad_token_id
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval(), tokenizer


def score_texts(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> list[float]:
    """The reward model's scalar for each full text (prompt and response already rendered)."""
    import torch

    scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            logits = model(**batch).logits
        scores.extend(float(v) for v in logits[:, 0])
    return scores


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int = 16) -> dict[str, float]:
    """Share of pairs whose chosen response scores above the rejected one, and the mean margin."""
    return pairwise_summary(*pair_scores(model, tokenizer, pairs, batch_size))


def pair_scores(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int = 16) -> tuple[list[float], list[float]]:
    """(chosen scores, rejected scores) of the pairs, each response rendered after its prompt."""
    if not pairs:
        return [], []
    prompts = [pair_prompt(p) for p in pairs]
    chosen = score_texts(model, tokenizer, [render_conversation(tokenizer, q, p["chosen"]) for q, p in zip(prompts, pairs)], batch_size)
    rejected = score_texts(model, tokenizer, [render_conversation(tokenizer, q, p["rejected"]) for q, p in zip(prompts, pairs)], batch_size)
    return chosen, rejected


def pairwise_summary(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    if not chosen:
        return {"accuracy": None, "margin": None, "n": 0, "ece": None, "brier": None}
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {
        "accuracy": round(sum(wins) / len(wins), 4),
        "margin": round(sum(c - r for c, r in zip(chosen, rejected)) / len(chosen), 4),
        "n": len(chosen),
        **calibration([c - r for c, r in zip(chosen, rejected)]),
    }


def calibration(margins: list[float], bins: int = 10) -> dict[str, float]:
    """How far the reward model's confidence can be trusted, from the held-out margins r_chosen - r_rejected.

    Under the Bradley-Terry model the reward model was trained with, p = sigmoid(margin) is its
    probability that `chosen` is preferred. `brier`: mean (1 - p)^2 (0 is perfect, 0.25 is a
    model that always says 0.5). `ece`: expected calibration error of its pairwise decisions, as
    for any binary classifier: each pair's decision (chosen above rejected or not) has confidence
    max(p, 1 - p); pairs are binned by confidence (`bins` equal-width bins on [0, 1]) and each bin's
    |accuracy - mean confidence| is weighted by its share of pairs. A model that is right on 68% of
    pairs while claiming 99% has an ECE near 0.31.
    """
    if not margins:
        return {"ece": None, "brier": None}
    probs = [1 / (1 + math.exp(-max(-60.0, min(60.0, m)))) for m in margins]
    brier = sum((1 - p) ** 2 for p in probs) / len(probs)
    grouped: dict[int, list[tuple[float, bool]]] = {}
    for p in probs:
        confidence = max(p, 1 - p)
        grouped.setdefault(min(int(confidence * bins), bins - 1), []).append((confidence, p > 0.5))
    ece = sum(
        len(items) / len(probs) * abs(sum(ok for _, ok in items) / len(items) - sum(c for c, _ in items) / len(items))
        for items in grouped.values()
    )
    return {"ece": round(ece, 4), "brier": round(brier, 4)}


def completion_text(completion: Any) -> str:
    """A TRL completion (a string, or a conversational list of messages) as plain text."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    return str(completion)


def reward_model_func(model: Any, tokenizer: Any) -> Callable[..., list[float]]:
    """A TRL reward function that scores prompt + completion with the learned reward model."""
    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [
            render_conversation(tokenizer, p if isinstance(p, list) else [{"role": "user", "content": p}], completion_text(c))
            for p, c in zip(prompts, completions)
        ]
        return score_texts(model, tokenizer, texts)

    return reward_model
