"""examples/quickstart/results.py: the README's results table from a run's manifests (planted runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepipe.examples.quickstart import results


def publish(workdir: Path, stage: str, key: str, metrics: dict, inputs: dict, finished: str, seconds: float = 10.0) -> Path:
    path = workdir / "artifacts" / stage / key
    path.mkdir(parents=True)
    manifest = {
        "stage": stage, "key": key, "metrics": metrics, "inputs": inputs,
        "timings": {"started_at": finished, "finished_at": finished, "seconds": seconds},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def sft_metrics(triples_f1: float) -> dict:
    return {
        "method": "lora",
        "eval_loss": {"sentiment": 0.03, "triples": 1.1},
        "heldout": {
            "sentiment": {"n": 64, "exact_match": 1.0, "token_f1": 1.0, "base_exact_match": 0.0, "base_token_f1": 0.0},
            "triples": {"n": 64, "exact_match": 0.02, "token_f1": triples_f1, "base_exact_match": 0.0, "base_token_f1": 0.001},
        },
    }


def evaluate_metrics(passed: bool) -> dict:
    return {
        "candidate": "align", "baseline": "sft", "primary_metric": "token_f1",
        "candidate_metrics": {"sentiment": {"exact_match": 1.0, "token_f1": 1.0}, "triples": {"exact_match": 0.03, "token_f1": 0.41}},
        "baseline_metrics": {"sentiment": {"exact_match": 1.0, "token_f1": 1.0}, "triples": {"exact_match": 0.02, "token_f1": 0.39}},
        "ab": {"judge": "reward_model", "win_rate": {"decisive_win_rate": 0.714, "confidence_level": 0.95}},
        "wins": 25, "ties": 93, "losses": 10, "win_rate": 0.559, "win_rate_ci_low": 0.537, "win_rate_ci_high": 0.854,
        "gate_passed": passed, "gate_reasons": ["PASS win rate lower bound 0.537 > 0.5", "PASS max task metric drop 0.02"],
    }


ALIGN = {
    "task_tolerance": 0.05,
    "heldout": {
        "triples": {
            "preferences": {"n": 30, "sft_accuracy": 0.9, "aligned_accuracy": 1.0, "implicit_reward_accuracy": 0.83, "implicit_reward_margin": 0.237},
            "task": {"n": 32, "task_metric": "token_f1", "sft": {"token_f1": 0.37}, "aligned": {"token_f1": 0.396},
                     "task_metric_within_tolerance": True, "kl_to_sft": 0.0034, "win_rate": 0.656},
        }
    },
}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Two runs in one workdir: an older one (another sft) and the newest, which must not mix."""
    publish(tmp_path, "data", "d1", {}, {}, "2026-11-30T07:00:00+00:00", 60)
    publish(tmp_path, "base_model", "b1", {}, {"data": {"stage": "data", "key": "d1"}}, "2026-11-30T07:01:00+00:00", 30)
    for key, f1, finished in (("s-old", 0.19, "07:05"), ("s-new", 0.39, "07:10")):
        publish(tmp_path, "sft", key, sft_metrics(f1), {"base_model": {"stage": "base_model", "key": "b1"}}, f"2026-11-30T{finished}:00+00:00", 300)
    publish(tmp_path, "reward", "r1", {"heldout_pairs": 60, "heldout_accuracy_before": 0.45, "heldout_accuracy": 0.8167},
            {"sft": {"stage": "sft", "key": "s-new"}}, "2026-11-30T07:12:00+00:00", 140)
    publish(tmp_path, "align", "a1", ALIGN, {"sft": {"stage": "sft", "key": "s-new"}, "reward": {"stage": "reward", "key": "r1"}},
            "2026-11-30T07:15:00+00:00", 180)
    publish(tmp_path, "evaluate", "e-old", evaluate_metrics(True), {"sft": {"stage": "sft", "key": "s-old"}}, "2026-11-30T07:06:00+00:00")
    publish(tmp_path, "evaluate", "e-new", evaluate_metrics(False),
            {"sft": {"stage": "sft", "key": "s-new"}, "align": {"stage": "align", "key": "a1"}, "reward": {"stage": "reward", "key": "r1"}},
            "2026-11-30T07:16:00+00:00", 60)
    return tmp_path


def test_the_newest_evaluate_and_only_its_own_inputs(workdir):
    last = results.latest_artifact(workdir, "evaluate")
    assert last.name == "e-new"
    stages = results.lineage(workdir, last)
    assert sorted(stages) == ["align", "base_model", "data", "evaluate", "reward", "sft"]
    assert stages["sft"]["key"] == "s-new"  # not the older run's adapters


def test_the_table_states_each_stage_s_numbers(workdir):
    table = results.results_markdown(results.lineage(workdir, results.latest_artifact(workdir, "evaluate")))
    assert "| triples | token F1 (n=64) | 0.00 | 0.39 | 0.41 | 0.39 |" in table
    assert "| sentiment | exact match (n=64) | 0.00 | 1.00 | 1.00 | 1.00 |" in table
    assert "0.45 → **0.82**" in table  # reward: held-out accuracy before → after
    assert "0.90 → **1.00**" in table and "0.83 / +0.237" in table  # align's objective on held-out pairs
    assert "0.37 → 0.40: within" in table
    assert "25 / 93 / 10; 0.71 [0.54, 0.85]; 0.56" in table
    assert "**held back**" in table  # e-new's gate failed


def test_write_then_check_and_a_stale_readme_fails(workdir, tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.RESULTS_BEGIN}\nold\n{results.RESULTS_END}\nmiddle\n{results.TIMES_BEGIN}\n{results.TIMES_END}\nend\n")
    monkeypatch.setattr(results, "README", readme)
    assert results.main([str(workdir), "--check"]) == 1
    assert results.main([str(workdir), "--write"]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert "| 60 s | 30 s | 300 s | 140 s | 180 s | 60 s | 12.8 min |" in text  # times: data .. evaluate, summed
    assert results.main([str(workdir), "--check"]) == 0
    # Wall times vary between runs and are not checked; a changed number is.
    manifest = workdir / "artifacts" / "evaluate" / "e-new" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["timings"]["seconds"] = 999
    manifest.write_text(json.dumps(data))
    assert results.main([str(workdir), "--check"]) == 0
    data["metrics"]["wins"] = 26
    manifest.write_text(json.dumps(data))
    capsys.readouterr()
    assert results.main([str(workdir), "--check"]) == 1
    assert "--write" in capsys.readouterr().err


def test_a_pretrained_base_is_named_and_its_loss_stated(tmp_path):
    publish(tmp_path, "pretrain", "p1", {"global_step": 122, "eval_loss": 1.031635, "eval_perplexity": 2.8056}, {}, "2026-11-30T07:01:00+00:00")
    publish(tmp_path, "sft", "s1", sft_metrics(0.43), {"pretrain": {"stage": "pretrain", "key": "p1"}}, "2026-11-30T07:02:00+00:00")
    last = publish(tmp_path, "evaluate", "e1", evaluate_metrics(True), {"sft": {"stage": "sft", "key": "s1"}}, "2026-11-30T07:03:00+00:00")
    table = results.results_markdown(results.lineage(tmp_path, last))
    assert "Base = the `pretrain` stage's model" in table
    assert "| `pretrain` | corpus validation loss / perplexity after 122 steps | 1.032 / 2.81 |" in table
    assert "**promoted**" in table and "`align`" not in table.split("| stage |")[1]  # no align stage in this run
    assert results.times_markdown(results.lineage(tmp_path, last)).splitlines()[0] == "| pretrain | sft | evaluate | sum |"
