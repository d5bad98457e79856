"""Does a fine-tune keep what its pretrained base knew? A small general-knowledge/chat set, asked
before and after.

`data/general_chat.jsonl` is tunepipe's own regression set (written for it, no outside source):
48 short questions with their acceptable answers: capitals, arithmetic, everyday facts, words and
one-line instructions. An answer counts when it contains one of them as whole words after
SQuAD normalisation ("The capital of France is Paris." answers "Paris"), the way a chat model's
open answers are scored. It runs only where the base knew something to lose: a pretrained model,
not one the pipeline's `base_model` stage initialised from scratch (such a model knows only the
pipeline's own tasks).

The sft stage reports base → trained on it, align SFT → aligned, and the evaluate stage puts it
among its regression entries (`general_chat`), where the gate's `max_forgetting_drop` holds back
a candidate that lost more than that.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from tunepipe.schemas.handoffs import PretrainKeyedConfig
from tunepipe.tasks.core.handoff import read_manifest_config
from tunepipe.tasks.lm.encoding import render_messages
from tunepipe.tasks.lm.metrics import contains_answer

SET_NAME = "general_chat"
SET_FILE = Path(__file__).resolve().parent / "data" / f"{SET_NAME}.jsonl"
METRIC = "contains_answer"
# Longest answer asked for: the accepted answers are a word or two, and a chat model's sentence
# around them fits (sft and align use this; evaluate has regression.general_max_new_tokens).
MAX_NEW_TOKENS = 32


@cache
def general_set() -> tuple[dict[str, Any], ...]:
    """The set's items: {id, prompt, answers}."""
    return tuple(json.loads(line) for line in SET_FILE.read_text(encoding="utf-8").splitlines() if line.strip())


def from_scratch(base_model: str, inputs: dict[str, Any]) -> bool:
    """Whether `base_model` is the pipeline's own base_model artifact, or pretrain's continuation of
    it: a model initialised from a seed, with no general knowledge to lose."""
    resolved = _resolved(base_model)
    built = inputs.get("base_model")
    if built is not None and resolved == _resolved(built.path):
        return True
    pretrain = inputs.get("pretrain")
    if pretrain is not None and resolved == _resolved(pretrain.path):
        # pretrain continued the built model when it was given no model of its own
        continued = read_manifest_config(pretrain, PretrainKeyedConfig, reader="general-knowledge check")
        return continued.base_model_fingerprint is None and built is not None
    return False


def applies(setting: Literal["auto", "on", "off"], base_model: str, inputs: dict[str, Any]) -> bool:
    """`auto`: on a pretrained base only; `on`/`off`: as said."""
    if setting == "auto":
        return not from_scratch(base_model, inputs)
    return setting == "on"


def prompts(tokenizer: Any, template: str, system_prompt: str | None = None) -> list[str]:
    """Each question rendered as a one-turn chat up to the answer."""
    rendered = []
    for item in general_set():
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": item["prompt"]}]
        rendered.append(render_messages(tokenizer, template, messages, True))
    return rendered


def scores(answers: list[str]) -> list[float]:
    """Per question: 1.0 when the answer contains one of its acceptable answers."""
    return [contains_answer(answer, item["answers"]) for answer, item in zip(answers, general_set())]


def mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def retention(before: list[str], after: list[str], labels: tuple[str, str]) -> dict[str, Any]:
    """{<before label>: score, <after label>: score, change, n, metric, set}: the share of questions
    answered, by the model before and after training."""
    first, second = mean(scores(before)), mean(scores(after))
    return {
        "set": SET_NAME, "metric": METRIC, "n": len(before),
        labels[0]: first, labels[1]: second, "change": round(second - first, 4),
        "lost": [item["id"] for item, b, a in zip(general_set(), scores(before), scores(after)) if b > a],
    }


def _resolved(path: str | Path) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else str(path)
