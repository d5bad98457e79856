"""The evaluate stage's config checks, metrics, gate reasons, judge parsing and lm-eval task files."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from tunepipe.schemas.evaluate import EvaluateConfig, GateRules
from tunepipe.tasks.evaluate import judges
from tunepipe.tasks.evaluate.gate import GateEvidence, decide
from tunepipe.tasks.evaluate.backends import completion_request
from tunepipe.tasks.evaluate.lm_eval_tasks import FILTER_MODULE, write_local_tasks
from tunepipe.tasks.evaluate.metrics import aggregate, load_callable, per_example, rouge_l, sentence_bleu
from tunepipe.tasks.core.stage import StageFailed


@pytest.mark.parametrize(
    "config, message",
    [
        ({"ab": {"judge": "endpoint"}}, "judge endpoint needs `endpoint`"),
        ({"metrics": ["meteor"]}, "unknown metrics"),
        ({"metrics": ["exact_match"]}, "primary_metric 'token_f1' is not computed"),
        ({"user_metrics": {"mine": "not a callable"}}, "is not `module:function`"),
        ({"generation": {"backend": "endpoint"}}, "backend endpoint needs `endpoint`"),
        ({"tasks": ["a"], "regression": {"tasks": ["a"]}}, "a forgetting check needs tasks not trained on"),
        ({"candidate": "base"}, "candidate: 'base' is not offered"),
        ({"gate": {"min_win_rate_lower_bound": 1.5}}, "less than or equal to 1"),
        ({"ab": {"judge": "rule", "endpoint": {"url": "http://h/v1", "model": "m"}}}, "only used with judge: endpoint"),
    ],
)
def test_invalid_configs_fail_at_validation(config, message):
    with pytest.raises(ValidationError, match=message):
        EvaluateConfig.model_validate(config)


def test_paths_resolve_against_the_yaml(tmp_path):
    (tmp_path / "adapters" / "prod").mkdir(parents=True)  # `owner/name` that is no local path would be a hub id
    config = EvaluateConfig.model_validate({"baseline": "adapters/prod", "lm_eval": {"include_paths": ["tasks"]}}, context={"base_dir": str(tmp_path)})
    assert config.baseline == str((tmp_path / "adapters/prod").resolve())
    assert config.lm_eval.include_paths == [str((tmp_path / "tasks").resolve())]


def test_metrics_by_hand():
    # ROUGE-L: LCS of "the cat sat" and "the cat sat down" is 3 → P=1, R=3/4, F=6/7.
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert sentence_bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    values = per_example({"exact_match": lambda p, r: float(p == r)}, ["a", "b"], ["a", "c"])
    assert values == {"exact_match": [1.0, 0.0]}
    assert aggregate(values, ["a", "b"], ["a", "c"]) == {"exact_match": 0.5}


def test_user_metrics_fail_clearly():
    with pytest.raises(StageFailed, match="cannot import module 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:f", "mine")
    with pytest.raises(StageFailed, match="has no function 'nope'"):
        load_callable("json:nope", "mine")
    with pytest.raises(StageFailed, match="must return a finite float"):
        per_example({"bad": lambda p, r: "yes"}, ["a"], ["a"])


def _evidence(**overrides) -> GateEvidence:
    win = {"wins": 15, "ties": 1, "losses": 4, "n": 20, "win_rate": 0.775, "decisive": 19, "decisive_win_rate": 0.7895,
           "ci_low": 0.6, "ci_high": 0.925, "confidence_level": 0.95}
    return GateEvidence(**{"primary_metric": "token_f1", "win": win, "judge": "rule", "tasks": {"a": (0.8, 0.5), "b": (0.69, 0.7)},
                           "regression": {"r": (0.4, 0.5)}, "p_value": 0.01, **overrides})


def test_gate_reasons_state_the_numbers():
    passed, reasons = decide(GateRules(max_forgetting_drop=0.2, require_significant=True), _evidence())
    assert passed is True
    assert reasons[0] == ("PASS win rate lower bound 0.600 > 0.5 (wins among 19 decisive pairs 0.789, exact 95% CI "
                          "[0.600, 0.925]; win rate 0.775; 15 wins / 1 ties / 4 losses by rule, n=20)")
    assert reasons[1].startswith("PASS max task metric drop 0.02: worst token_f1 change -0.010 on b (0.700 → 0.690)")
    assert reasons[2].startswith("PASS max forgetting drop 0.2: worst regression change -0.100 on r")
    assert reasons[3] == "PASS significant: sign test p = 0.01 < alpha 0.05 on token_f1"

    passed, reasons = decide(GateRules(max_task_metric_drop=0.005, max_forgetting_drop=0.05, require_significant=True),
                             _evidence(p_value=0.2, win=_evidence().win.model_copy(update={"ci_low": 0.45})))
    assert passed is False and [r[:4] for r in reasons] == ["FAIL"] * 4
    assert "0.450 <= 0.5" in reasons[0] and "a drop of 0.010 > 0.005" in reasons[1]


def test_gate_fails_without_evidence():
    passed, reasons = decide(GateRules(), _evidence(win={"wins": 0, "ties": 1, "losses": 0, "n": 1, "win_rate": 0.5, "decisive": 0, "decisive_win_rate": None,
                                                             "ci_low": None, "ci_high": None, "confidence_level": 0.95}, regression={}))
    assert passed is False and "no interval (no decisive pair; 0 wins / 1 ties / 0 losses by rule, n=1)" in reasons[0]
    assert reasons[2] == "SKIP max forgetting drop: no regression tasks configured"


def test_judge_verdicts_and_position_swap():
    assert [judges.parse_verdict(t) for t in ("A", "b.", "Tie", "I think B is better", "neither")] == ["A", "B", "TIE", "B", None]
    assert judges.combine("A", "B", swapped=True) == "win"  # candidate first: A; candidate second: B
    assert judges.combine("B", "A", swapped=True) == "loss"
    assert judges.combine("A", "A", swapped=True) == "tie"  # position bias, not a preference
    assert judges.combine(None, "B", swapped=True) == "tie"
    assert judges.combine("A", None, swapped=False) == "win"
    pair = judges.Pair("t", [{"role": "user", "content": "Q?"}], "ref", "cand", "base")
    text = judges.judge_messages(pair, "cand", "base")[1]["content"]
    assert "[Answer A]\ncand" in text and "[Answer B]\nbase" in text and "[Reference answer]\nref" in text


def test_completion_payload_keeps_the_prompt_as_rendered():
    payload = completion_request("adapter-a", ["<s>p1", "p2"], 32)
    assert payload["prompt"] == ["<s>p1", "p2"] and payload["temperature"] == 0.0 and payload["max_tokens"] == 32
    assert payload["extra_body"]["add_special_tokens"] is False


def test_local_lm_eval_task_files(tmp_path):
    names = write_local_tasks(tmp_path, {"my task": [("P1", "R1"), ("P2", "R2")]}, 16, cache_dir="/c")
    assert names == {"my task": "tunepipe_my_task"}
    text = (tmp_path / "tunepipe_my_task.yaml").read_text()
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda l, node: ("function", l.construct_scalar(node)))
    spec = yaml.load(text, Loader=loader)
    assert spec["output_type"] == "generate_until" and spec["doc_to_text"] == "prompt" and spec["doc_to_target"] == "reference"
    assert spec["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "tunepipe_my_task.jsonl")}, "cache_dir": "/c"}
    assert spec["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": 16}
    assert spec["filter_list"][0]["filter"][0]["filter_fn"] == ("function", f"{FILTER_MODULE}.answer_my_task")
    assert (tmp_path / f"{FILTER_MODULE}.py").exists()
    # references are stored normalised as the task's scorer normalises (SQuAD by default)
    assert (tmp_path / "tunepipe_my_task.jsonl").read_text().splitlines()[0] == '{"prompt": "P1", "reference": "r1"}'


def test_lm_eval_filter_scores_as_the_stage_does(tmp_path):
    """The filter module written next to the tasks normalises (and reads labels) like the stage's
    scorer, without importing tunepipe: filtered answer == stored reference exactly when the stage
    counts an exact match."""
    import importlib.util
    import json

    from tunepipe.tasks.lm.metrics import TaskScorer

    scorers = {"sentiment": TaskScorer(labels=("positive", "negative")), "triples": TaskScorer("whitespace")}
    rows = {"sentiment": [("p", "positive"), ("p", "negative")], "triples": [("p", "(A, r, B)")]}
    write_local_tasks(tmp_path, rows, 8, scorers=scorers)
    source = (tmp_path / f"{FILTER_MODULE}.py").read_text()
    assert "tunepipe" not in source.split('"""', 2)[2]  # runs where tunepipe is not installed
    spec = importlib.util.spec_from_file_location("filters", tmp_path / f"{FILTER_MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answers = {"sentiment": ["The review is positive.", "It is positive, not negative."], "triples": ["(a, r, B)"]}
    for task, task_rows in rows.items():
        stored = [json.loads(line)["reference"] for line in (tmp_path / f"tunepipe_{task}.jsonl").read_text().splitlines()]
        filtered = getattr(module, f"answer_{task}")([[a] for a in answers[task]], None)
        lm_eval = [float(f[0] == r) for f, r in zip(filtered, stored)]
        stage = [scorers[task].exact_match(a, r) for a, (_, r) in zip(answers[task], task_rows)]
        assert lm_eval == stage
    assert [getattr(module, "answer_sentiment")([["The review is positive."]], None)] == [[["positive"]]]


def test_serving_baseline_follows_the_registry_and_enters_the_key(tmp_path):
    from tunepipe.tasks.core.registry import AdapterRegistry
    from tunepipe.tasks.evaluate.stage import EvaluateStage
    from tunepipe.tasks.evaluate.sources import ModelSource, resolve_baseline

    candidate = ModelSource("align", "adapters", "/base", tmp_path, {"triples": "a/triples", "sentiment": "a/sentiment"})
    config = EvaluateConfig.model_validate({"baseline": "serving", "registry": str(tmp_path / "registry"), "registry_name": "qs"})
    stage = EvaluateStage()
    # Nothing serving yet: the base model is what a first deploy replaces.
    assert resolve_baseline(config, {}, candidate).kind == "base"
    empty_key = stage.key_payload(config)["serving"]

    registry = AdapterRegistry(tmp_path / "registry")
    for task in ("triples", "sentiment"):
        adapter = tmp_path / "adapters" / task
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(f'{{"r": 8, "task": "{task}"}}')
        registry.promote(f"qs-{task}", registry.register(f"qs-{task}", adapter))
    baseline = resolve_baseline(config, {}, candidate)
    assert baseline.kind == "adapters" and baseline.name == "serving qs-triples@1, qs-sentiment@1"
    assert baseline.spec("triples").adapter == registry.resolve("qs-triples@prod").path
    assert stage.key_payload(config)["serving"] != empty_key  # a deploy changes what evaluate compares with


def test_serving_baseline_needs_a_registry_name():
    with pytest.raises(ValidationError, match="baseline serving needs `registry` and `registry_name`"):
        EvaluateConfig.model_validate({"baseline": "serving"})


def _gate_on(outcomes: list[str], rules: GateRules | None = None) -> tuple[bool, str]:
    from tunepipe.tasks.evaluate.stats import win_rate

    passed, reasons = decide(rules or GateRules(max_task_metric_drop=None, max_forgetting_drop=None), _evidence(win=win_rate(outcomes)))
    return passed, reasons[0]


def test_gate_holds_back_a_tie_heavy_candidate():
    # The case: 4 wins, 28 ties, no loss. Neither the exact interval (sign test p = 0.0625)
    # nor the decisive-pair minimum lets it through; both are said.
    passed, reason = _gate_on(["win"] * 4 + ["tie"] * 28)
    assert passed is False
    assert reason.startswith("FAIL win rate lower bound 0.398 <= 0.5") and "only 4 decisive pairs, need at least 10" in reason
    # Enough decisive pairs but still too few to be sure (7 of 10): the interval holds it back alone.
    passed, reason = _gate_on(["win"] * 7 + ["loss"] * 3 + ["tie"] * 22)
    assert passed is False and "0.347 <= 0.5" in reason and "need at least" not in reason
    # A sure interval on too few decisive pairs (8 of 8, lower bound 0.631): the minimum holds it back.
    passed, reason = _gate_on(["win"] * 8 + ["tie"] * 24)
    assert passed is False and "0.631 > 0.5" in reason and "only 8 decisive pairs" in reason
    passed, _ = _gate_on(["win"] * 8 + ["tie"] * 24, GateRules(min_decisive_pairs=8, max_task_metric_drop=None, max_forgetting_drop=None))
    assert passed is True


def test_gate_promotes_a_clearly_better_candidate_with_its_evidence():
    passed, reason = _gate_on(["win"] * 20 + ["loss"] * 2 + ["tie"] * 10)
    assert passed is True
    assert reason == ("PASS win rate lower bound 0.708 > 0.5 (wins among 22 decisive pairs 0.909, exact 95% CI [0.708, 0.989]; "
                      "win rate 0.781; 20 wins / 10 ties / 2 losses by rule, n=32)")


def test_ab_plot_brackets_the_decisive_win_rate_with_its_interval(tmp_path):
    """10 wins, 30 ties, 0 losses: the tie-as-half win rate (0.625) lies below the exact interval of
    the decisive share ([0.69, 1.0]); the plot draws the share the interval is for."""
    from tunepipe.tasks.evaluate.report import plot_ab
    from tunepipe.tasks.evaluate.stats import win_rate

    win = win_rate(["win"] * 10 + ["tie"] * 30)
    assert win["win_rate"] < win["ci_low"] <= win["decisive_win_rate"] == 1.0
    ab = {"judge": "rule", "win_rate": win, "per_task": {"t": {"wins": 10, "ties": 30, "losses": 0}}}
    plot_ab({"ab": ab}, tmp_path / "ab.png")
    assert (tmp_path / "ab.png").read_bytes()[:4] == b"\x89PNG"


def test_gate_holds_back_an_aligned_candidate_that_dropped_its_task_metric():
    """The gate reads what align measured: a drop from SFT beyond align.task_tolerance fails it,
    whatever the A/B says."""
    win = {"wins": 30, "ties": 0, "losses": 0, "n": 30, "decisive": 30, "decisive_win_rate": 1.0, "win_rate": 1.0,
           "ci_low": 0.88, "ci_high": 1.0, "confidence_level": 0.95}
    dropped = {"within": False, "drops": {"sentiment": 0.375, "triples": 0.0}, "metric": "token_f1", "tolerance": 0.05}
    rules = GateRules()
    passed, reasons = decide(rules, GateEvidence(primary_metric="exact_match", win=win, judge="rule", alignment=dropped))
    assert passed is False
    assert reasons[-1] == "FAIL align kept token_f1 within its tolerance 0.05 of SFT (drop per run: sentiment +0.375, triples +0.000)"
    kept = {**dropped, "within": True, "drops": {"sentiment": 0.01}}
    assert decide(rules, GateEvidence(primary_metric="exact_match", win=win, judge="rule", alignment=kept))[0] is True
    # Not an align candidate: no such rule; the rule can be switched off.
    assert not any("align kept" in r for r in decide(rules, GateEvidence(primary_metric="exact_match", win=win, judge="rule"))[1])
    off = GateRules(require_align_within_tolerance=False)
    assert decide(off, GateEvidence(primary_metric="exact_match", win=win, judge="rule", alignment=dropped))[0] is True


def test_gate_evidence_carries_the_confidence_level_and_refuses_malformed_win_rates():
    # alpha is 1 - ab.confidence_level, derived in one place from the level the evidence carries
    rules = GateRules(min_win_rate_lower_bound=None, require_significant=True)
    assert _evidence(confidence_level=0.99).alpha == 0.01
    reasons = decide(rules, _evidence(p_value=0.02, confidence_level=0.99))[1]
    assert "FAIL significant: sign test p = 0.02 >= alpha 0.01 on token_f1" in reasons
    assert "PASS significant: sign test p = 0.02 < alpha 0.05 on token_f1" in decide(rules, _evidence(p_value=0.02))[1]
    with pytest.raises(ValueError, match="win.wins"):
        _evidence(win={**_evidence().win.model_dump(), "wins": "many"})
    with pytest.raises(ValueError, match="win.ci_lo"):
        _evidence(win={**_evidence().win.model_dump(), "ci_lo": 0.6})
