"""An AI judge behind an OpenAI-compatible chat endpoint (tunepipe's own server, vLLM, a hosted
API), shared by the evaluate stage (A/B judging) and align (RLAIF: on-policy pair scoring and a
GRPO/RLOO reward).

The judge compares two answers to one conversation, given a reference answer, and replies A, B
or TIE. Position bias is controlled by asking both orders: an answer wins only if it wins in
both; a verdict that flips with the order (or no parsable verdict) is a tie.

`CachedJudge` adds what a training-time judge needs: judgments cached by content (a JSON-lines
file keyed by the sha256 of the request body, so a rerun or a resumed attempt asks nothing twice)
and a budget on real calls (`max_calls`; when it is spent the stage fails, or further comparisons
count as ties, by `on_budget_exhausted`). The API key is read from the environment variable the
config names, at call time: it is never part of a config, key, manifest or log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

from tunepipe.tasks.core.secrets import remember, url_parts
from tunepipe.tasks.core.stage import StageFailed

JUDGE_SYSTEM = (
    "You are a strict evaluator. Given a conversation, a reference answer and two candidate answers A and B, "
    "decide which answer is better: more correct with respect to the reference, then more helpful and concise. "
    "Reply with exactly one word: A, B, or TIE."
)
_VERDICT = re.compile(r"\b(A|B|TIE)\b", re.IGNORECASE)
FIRST, SECOND, TIE = "first", "second", "tie"
NO_REFERENCE = "(none given)"  # preference pairs carry no reference answer


def openai_client(endpoint: Any, who: str = "evaluate") -> Any:
    """The official client for an endpoint (`schemas.evaluate.EndpointSettings`); the key comes from
    the environment variable `api_key_env` names (a placeholder when none is named: vLLM needs none)."""
    from openai import OpenAI

    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if endpoint.api_key_env and not key:
        raise StageFailed(f"{who}: {endpoint.url}: the API key variable {endpoint.api_key_env} is not set")
    if key:
        remember(key)  # masked in every log line from here on
    base, query = url_parts(endpoint.url, f"{who}: url")  # a base URL's query (?api-version=) rides on every request
    return OpenAI(base_url=base, api_key=key or "EMPTY", timeout=endpoint.timeout_s, max_retries=endpoint.max_retries,
                  default_query=query or None)


def judge_messages(conversation: list[dict[str, str]], reference: str, first: str, second: str) -> list[dict[str, str]]:
    """The judge's chat request: the conversation, the reference, answer A (`first`) and B (`second`)."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in conversation)
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {
            "role": "user",
            "content": f"[Conversation]\n{text}\n\n[Reference answer]\n{reference}\n\n"
            f"[Answer A]\n{first}\n\n[Answer B]\n{second}\n\nWhich is better? Reply A, B or TIE.",
        },
    ]


def parse_verdict(text: str) -> str | None:
    """"A", "B", "TIE" (the first such word), or None when the judge said none of them."""
    match = _VERDICT.search(text or "")
    return match.group(1).upper() if match else None


def combine(forward: str | None, backward: str | None, swapped: bool) -> str:
    """FIRST, SECOND or TIE for the answer asked first as A (`forward`) and then as B (`backward`).
    With both orders asked, a winner must win in both; anything else (and no verdict) is a tie."""
    one = {"A": FIRST, "B": SECOND}.get(forward or "", TIE)
    if not swapped:
        return one
    two = {"A": SECOND, "B": FIRST}.get(backward or "", TIE)
    return one if one == two else TIE


class CachedJudge:
    """Pairwise judgments with a content cache and a call budget (`settings`: schemas.align.AIJudgeConfig)."""

    def __init__(self, settings: Any, cache_path: str | Path, who: str = "align", calls_already_made: int = 0) -> None:
        self.settings = settings
        self.who = who
        self.cache_path = Path(cache_path)
        self.cache: dict[str, str] = {}
        if self.cache_path.is_file():
            for line in self.cache_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash mid-write
                self.cache[row["key"]] = row["reply"]
        self.counts = {"calls": calls_already_made, "cache_hits": 0, "unparsed": 0, "order_disagreements": 0, "skipped_over_budget": 0}
        self._client: Any = None
        self._lock = threading.Lock()

    def request(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {"model": self.settings.model, "messages": messages, "temperature": 0.0, "max_tokens": self.settings.max_tokens}

    def ask(self, messages: list[dict[str, str]]) -> str | None:
        """One verdict (A, B, TIE or None): from the cache, else from the endpoint within the budget."""
        body = self.request(messages)
        key = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        with self._lock:
            if key in self.cache:
                self.counts["cache_hits"] += 1
                return parse_verdict(self.cache[key])
            if self.counts["calls"] >= self.settings.max_calls:
                if self.settings.on_budget_exhausted == "fail":
                    raise StageFailed(
                        f"{self.who}: the judge's call budget is spent (judge.max_calls {self.settings.max_calls}; cached "
                        f"judgments are free and were used): raise judge.max_calls, or set judge.on_budget_exhausted: stop "
                        "to count the remaining comparisons as ties"
                    )
                self.counts["skipped_over_budget"] += 1
                return None
            self.counts["calls"] += 1
        if self._client is None:
            self._client = openai_client(self.settings, self.who)
        response = self._client.chat.completions.create(**body)
        reply = response.choices[0].message.content or ""
        with self._lock:
            self.cache[key] = reply
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self.cache_path.open("a") as handle:
                handle.write(json.dumps({"key": key, "reply": reply}) + "\n")
        verdict = parse_verdict(reply)
        if verdict is None:
            self.counts["unparsed"] += 1
        return verdict

    def compare(self, conversation: list[dict[str, str]], reference: str, first: str, second: str) -> str:
        """FIRST, SECOND or TIE, with both orders asked when `swap_positions` is on."""
        forward = self.ask(judge_messages(conversation, reference, first, second))
        backward = self.ask(judge_messages(conversation, reference, second, first)) if self.settings.swap_positions else None
        outcome = combine(forward, backward, self.settings.swap_positions)
        if self.settings.swap_positions and outcome == TIE and forward in ("A", "B") and backward in ("A", "B"):
            self.counts["order_disagreements"] += 1  # the judge picked a position, not an answer
        return outcome

    def tournament(self, conversation: list[dict[str, str]], reference: str, answers: list[str]) -> list[float]:
        """Each answer's share of won comparisons against the others (ties: half), in [0, 1].
        Identical answers are not compared (a tie without asking)."""
        points = [0.0] * len(answers)
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                outcome = TIE if answers[i] == answers[j] else self.compare(conversation, reference, answers[i], answers[j])
                points[i] += {FIRST: 1.0, TIE: 0.5}.get(outcome, 0.0)
                points[j] += {SECOND: 1.0, TIE: 0.5}.get(outcome, 0.0)
        others = max(len(answers) - 1, 1)
        return [p / others for p in points]

    def agreement(self, pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """How often the judge prefers a dataset pair's `chosen` answer over its `rejected` one."""
        agree = disagree = ties = 0
        for pair in pairs:
            conversation = pair.get("prompt_messages") or [{"role": "user", "content": pair["prompt"]}]
            outcome = self.compare(conversation, pair.get("reference") or NO_REFERENCE, pair["chosen"], pair["rejected"])
            agree += outcome == FIRST
            disagree += outcome == SECOND
            ties += outcome == TIE
        n = len(pairs)
        return {
            "pairs": n, "agree": agree, "disagree": disagree, "tie": ties,
            "agreement": round(agree / n, 4) if n else None,
            "agreement_decided": round(agree / (agree + disagree), 4) if agree + disagree else None,
        }

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)
