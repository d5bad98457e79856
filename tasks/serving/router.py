"""Online A/B: requests for the router's name go to one of its adapter versions by weight.

Assignment is sticky per user when requests carry OpenAI's `user` field (a hash of router name
and user picks the arm, so a user never flips between versions), random otherwise. Every routed
request appends one JSON line to the log: which version served it, for whom, how many tokens,
how long it took and whether it succeeded, which is what an A/B analysis joins feedback against.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tunepipe.schemas.serve import RouterConfig


@dataclass
class Assignment:
    request_id: str
    router: str
    version: str
    user: str | None
    started: float


class WeightedRouter:
    def __init__(self, config: RouterConfig):
        self.name = config.name
        self.versions = list(config.versions)
        total = sum(config.versions.values())
        self.cumulative = list(_accumulate(w / total for w in config.versions.values()))
        self.sticky = config.sticky
        self.random = random.Random(config.seed)
        self.log_path = Path(config.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _pick(self, u: float) -> str:
        return self.versions[min(bisect.bisect_right(self.cumulative, u), len(self.versions) - 1)]

    def choose(self, user: str | None = None) -> Assignment:
        if self.sticky and user:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            with self._lock:
                u = self.random.random()
        return Assignment(f"ab-{uuid.uuid4().hex[:16]}", self.name, self._pick(u), user, time.monotonic())

    def record(self, assignment: Assignment, *, endpoint: str, status: str, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        line = {
            "time": time.time(), "request_id": assignment.request_id, "router": assignment.router,
            "version": assignment.version, "user": assignment.user, "endpoint": endpoint, "status": status,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "latency_ms": round((time.monotonic() - assignment.started) * 1000, 2),
        }
        with self._lock, self.log_path.open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
