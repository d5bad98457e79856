"""RLAIF against a real OpenAI-compatible judge server (FastAPI + uvicorn on a local port, driven
by the official `openai` client): position-bias control, the content cache, the call budget and
the key taken from an environment variable; then the align stage scoring on-policy DPO pairs and
GRPO rewards with the judge, and reporting the judge's agreement with the dataset's preferences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tunepipe.schemas.align import AIJudgeConfig, AlignConfig
from tunepipe.tasks.align.stage import JUDGE_CACHE, AlignStage
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.serving.process import ServerThread
from tunepipe.tasks.lm.judge import FIRST, SECOND, TIE, CachedJudge

from tests.helpers.alignment import build_assets, data_with_pairs, env
from tests.helpers.judge_server import judge_app
from tests.helpers.training import WORDS

torch.set_num_threads(1)

SECRET = "sk-judge-test-0123456789"
KEY_ENV = "TUNEPIPE_TEST_JUDGE_KEY"
ASK = [{"role": "user", "content": "Describe the cat."}]


@pytest.fixture(scope="module")
def server():
    requests: list[dict] = []
    with ServerThread(judge_app(SECRET, requests)) as running:
        yield {"url": running.url + "/v1", "requests": requests}


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def settings(server, **kw) -> AIJudgeConfig:
    return AIJudgeConfig.model_validate({"url": server["url"], "model": "rule-judge", "api_key_env": KEY_ENV, "max_retries": 0, **kw})


def test_both_orders_cache_and_budget(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge = CachedJudge(settings(server), cache)
    before = len(server["requests"])
    assert judge.compare(ASK, "(none given)", "the cat is here", "one two three") == FIRST
    assert judge.compare(ASK, "(none given)", "one two three", "the cat is here") == SECOND
    # Equal answers by the rule: the server says "A" both times (position bias): a tie, counted.
    assert judge.compare(ASK, "(none given)", "one two", "six ten") == TIE
    assert judge.stats()["order_disagreements"] == 1
    # 3 comparisons x 2 orders, the second comparison's requests being the first one's swapped: 4 distinct.
    assert len(server["requests"]) - before == 4 and judge.stats() == {**judge.stats(), "calls": 4, "cache_hits": 2}
    assert {r["model"] for r in server["requests"][before:]} == {"rule-judge"}

    # A new judge on the same cache file (a resumed attempt) asks nothing again.
    again = CachedJudge(settings(server, max_calls=1), cache)
    assert again.compare(ASK, "(none given)", "one two", "six ten") == TIE
    assert len(server["requests"]) - before == 4 and again.stats()["calls"] == 0
    assert SECRET not in cache.read_text()

    # The budget counts real calls only; spent, it fails naming the knob, or stops judging (ties).
    with pytest.raises(StageFailed, match="max_calls 1"):
        again.compare(ASK, "(none given)", "the cat", "a dog sat")  # the first order is the one call allowed
    assert len(server["requests"]) - before == 5 and again.stats()["calls"] == 1
    stopping = CachedJudge(settings(server, max_calls=1, on_budget_exhausted="stop"), tmp_path / "other.jsonl")
    assert stopping.tournament(ASK, "(none given)", ["the cat", "x y", "z"]) == [0.5, 0.5, 0.5]
    assert stopping.stats()["skipped_over_budget"] == 5


def test_key_comes_from_the_named_variable(server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(StageFailed, match=f"API key variable {KEY_ENV} is not set"):
        CachedJudge(settings(server), tmp_path / "c.jsonl").compare(ASK, "r", "a", "b")
    monkeypatch.setenv(KEY_ENV, "wrong")
    import openai

    with pytest.raises(openai.AuthenticationError):
        CachedJudge(settings(server), tmp_path / "c.jsonl").compare(ASK, "r", "a", "b")


def test_tournament_ranks_by_share_of_wins(server, tmp_path):
    judge = CachedJudge(settings(server), tmp_path / "cache.jsonl")
    scores = judge.tournament([{"role": "user", "content": "Count."}], "one two three", ["one two three", "one two", "five", "one"])
    # "one two three" beats all; "one two" beats the two others; "one" (overlap 1) beats "five" (0).
    assert scores == [1.0, 2 / 3, 0.0, 1 / 3]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    assets = build_assets(tmp_path_factory.mktemp("rlaif"))
    words = WORDS[:12]
    pairs = []
    for i, w in enumerate(words):
        chosen, rejected = f"the {w} is here", "one two three"  # the judge agrees: overlap with the prompt
        if i in (3, 7):
            chosen, rejected = rejected, chosen  # the dataset and the judge disagree
        if i in (5, 11):
            chosen, rejected = "one two", "six ten"  # equal by the rule: order flip -> tie
        pairs.append({"id": f"j{i}", "task": "count", "prompt": f"Describe the {w}.", "chosen": chosen, "rejected": rejected,
                      "split": "test" if i % 3 == 2 else "train"})
    assets["judge_data"] = data_with_pairs(assets, "data-judge", pairs)
    return assets


def _align(assets, server, config: dict):
    cfg = AlignConfig.model_validate(
        {"max_length": 64, "heldout": {"max_examples_per_task": 0, "max_pairs": 0},
         "judge": {"url": server["url"], "model": "rule-judge", "api_key_env": KEY_ENV, "agreement_pairs": 12}, **config}
    )
    ref = run_stage(AlignStage(), cfg, {"data": assets["judge_data"], "sft": assets["sft"]}, assets["store"], env())
    return ref, json.loads((Path(ref.path) / "manifest.json").read_text())


def _no_secret_anywhere(ref) -> None:
    for path in Path(ref.path).rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".txt", ".log", ""):
            assert SECRET not in path.read_text(errors="ignore"), path


def test_on_policy_dpo_pairs_scored_by_the_judge(assets, server):
    before = len(server["requests"])
    ref, manifest = _align(
        assets, server,
        {"method": {"name": "dpo", "beta": 0.5},
         "preferences": {"source": "on_policy", "scorer": "judge", "k": 3, "max_prompts": 6, "max_new_tokens": 6},
         "training": {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0}},
    )
    m = manifest["metrics"]
    pairs = [json.loads(line) for line in (Path(ref.path) / "preferences.on_policy.jsonl").read_text().splitlines()]
    assert pairs and all(p["scores"][0] > p["scores"][1] for p in pairs)
    used = m["judge"]["runs"]["all"]
    # k=3 samples and the greedy answer: 6 comparisons per prompt, each in both orders (identical answers are not asked).
    assert 0 < used["calls"] + used["cache_hits"] <= 6 * 6 * 2
    assert m["judge"]["agreement"] == {"pairs": 12, "agree": 8, "disagree": 2, "tie": 2, "agreement": 0.6667, "agreement_decided": 0.8}
    assert m["judge"]["agreement_counts"]["order_disagreements"] == 2
    assert len(server["requests"]) - before == m["judge"]["calls"]
    # The endpoint is in the stage's key; the secret is not in the config, the manifest or any file.
    assert manifest["config"]["judge"]["api_key_env"] == KEY_ENV and SECRET not in json.dumps(manifest)
    _no_secret_anywhere(ref)
    # The cache lives in the staging dir's checkpoints (reused by a resumed attempt), not in the artifact.
    assert not list(Path(ref.path).rglob(JUDGE_CACHE))


def test_grpo_with_the_judge_as_reward(assets, server):
    ref, manifest = _align(
        assets, server,
        {"method": {"name": "grpo", "rewards": ["judge"], "num_generations": 2, "max_completion_length": 6, "beta": 0.0},
         "max_prompts": 4, "training": {"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0}},
    )
    m = manifest["metrics"]
    rewards = m["step_metrics"]["all"]["judge_reward"]
    # Two completions per prompt: one comparison; the rewards of a group sum to 1, so the mean is 0.5.
    assert len(rewards) == 2 and all(r["value"] == pytest.approx(0.5) for r in rewards)
    assert m["judge"]["runs"]["all"]["calls"] + m["judge"]["runs"]["all"]["cache_hits"] > 0
    _no_secret_anywhere(ref)


def test_judge_settings_are_checked(server):
    with pytest.raises(ValueError, match="needs a `judge:` section"):
        AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["judge"]}})
    with pytest.raises(ValueError, match="http"):
        AlignConfig.model_validate({"method": {"name": "grpo", "rewards": ["judge"]}, "judge": {"url": "ftp://x", "model": "m"}})


def test_a_failed_attempt_over_budget_resumes_from_the_cached_judgments(assets, server, tmp_path):
    from tunepipe.tasks.core.artifacts import ArtifactStore

    def attempt(store, max_calls: int):
        cfg = AlignConfig.model_validate(
            {"max_length": 64, "heldout": {"max_examples_per_task": 0, "max_pairs": 0},
             "method": {"name": "dpo"}, "training": {"max_steps": 1, "warmup_ratio": 0.0},
             "preferences": {"source": "on_policy", "scorer": "judge", "k": 3, "max_prompts": 6, "max_new_tokens": 6},
             "judge": {"url": server["url"], "model": "rule-judge", "api_key_env": KEY_ENV, "max_calls": max_calls, "agreement_pairs": 0}}
        )
        ref = run_stage(AlignStage(), cfg, {"data": assets["judge_data"], "sft": assets["sft"]}, store, env())
        return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["judge"]["runs"]["all"]

    needed = attempt(ArtifactStore(tmp_path / "unbounded"), 1000)["calls"]
    assert needed >= 6
    store = ArtifactStore(tmp_path / "bounded")
    budget = needed // 2 + 1
    with pytest.raises(StageFailed, match=f"max_calls {budget}"):
        attempt(store, budget)
    # Same config, same key: the attempt resumes in the same staging dir, where the first attempt's
    # judgments are cached; only the rest are asked, within the same budget.
    second = attempt(store, budget)
    assert second["cache_hits"] == budget and second["calls"] == needed - budget
