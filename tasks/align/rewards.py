"""Reward functions: rule-based (verifiable, against the record's reference answer) and the
learned reward model (a `reward` stage artifact).

Rules reuse the held-out scoring of the sft stage (`exact_match`, `token_f1`), plus a format
rule for the quickstart's relation triples `(a, rel, b); (c, rel, d)`. Each rule is also offered
as a TRL reward function (`reward_funcs` of GRPO/RLOO: called with the prompts, the completions
and the dataset's other columns, here `reference`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from tasks.sft.heldout import exact_match, token_f1

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


def completion_text(completion: Any) -> str:
    """A TRL completion (a string, or a conversational list of messages) as plain text."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")
    return str(completion)


def rule_reward_func(name: str) -> Callable[..., list[float]]:
    """A TRL reward function scoring completions with rule `name` against the `reference` column."""
    rule = RULES[name]

    def reward(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        return [rule(completion_text(c).strip(), ref) for c, ref in zip(completions, reference)]

    reward.__name__ = name  # TRL logs each reward function's mean under `rewards/<name>/mean`
    return reward


# --------------------------------------------------------------------------------------------
# The learned reward model


def load_reward_model(reward_dir: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(sequence-classification model, tokenizer) of a reward artifact; an adapter is merged into
    its base so the result is a plain model (PPO's `get_reward` needs `.score` and the backbone)."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from tasks.modeling import load_tokenizer, torch_dtype

    root = Path(reward_dir)
    outputs = json.loads((root / "outputs.json").read_text())
    path = root / outputs["paths"]["all"]
    tokenizer = load_tokenizer(str(path))
    if outputs["kind"] == "model":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch_dtype(dtype))
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(outputs["base_model"], num_labels=1, dtype=torch_dtype(dtype))
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
    from tasks.align.common import pair_prompt, render_conversation

    if not pairs:
        return {"accuracy": None, "margin": None, "n": 0}
    prompts = [pair_prompt(p) for p in pairs]
    chosen = score_texts(model, tokenizer, [render_conversation(tokenizer, q, p["chosen"]) for q, p in zip(prompts, pairs)], batch_size)
    rejected = score_texts(model, tokenizer, [render_conversation(tokenizer, q, p["rejected"]) for q, p in zip(prompts, pairs)], batch_size)
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {
        "accuracy": round(sum(wins) / len(wins), 4),
        "margin": round(sum(c - r for c, r in zip(chosen, rejected)) / len(pairs), 4),
        "n": len(pairs),
    }


def reward_model_func(model: Any, tokenizer: Any) -> Callable[..., list[float]]:
    """A TRL reward function that scores prompt + completion with the learned reward model."""
    from tasks.align.common import render_conversation

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        texts = [
            render_conversation(tokenizer, p if isinstance(p, list) else [{"role": "user", "content": p}], completion_text(c))
            for p, c in zip(prompts, completions)
        ]
        return score_texts(model, tokenizer, texts)

    return reward_model
