"""examples/real-model/results.py: the README's tables from a run's manifests (planted runs), read generically:
every metric evaluate reports, and a retention (regression set) row whenever the run has one. ~1 s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "real-model"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"real_model_{name}", EXAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results = _load("results")


def publish(workdir: Path, stage: str, key: str, metrics: dict, inputs: dict, finished: str, seconds: float = 10.0,
            config: dict | None = None) -> Path:
    path = workdir / "artifacts" / stage / key
    path.mkdir(parents=True)
    manifest = {"stage": stage, "key": key, "metrics": metrics, "inputs": inputs, "config": config or {},
                "timings": {"started_at": finished, "finished_at": finished, "seconds": seconds}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


SFT = {
    "method": "lora", "eval_loss": {"all": 0.412},
    "heldout": {
        "capitals": {"n": 6, "exact_match": 0.5, "token_f1": 0.6, "base_exact_match": 0.1667, "base_token_f1": 0.3},
        "sentiment": {"n": 6, "exact_match": 1.0, "token_f1": 1.0, "base_exact_match": 0.0, "base_token_f1": 0.2},
    },
}
ALIGN = {"heldout": {"all": {"preferences": {"n": 6, "sft_accuracy": 0.8333, "aligned_accuracy": 1.0}}}}


def evaluate_metrics(regression: dict | None = None) -> dict:
    return {
        "candidate": "align", "baseline": "base", "metric_names": ["exact_match", "token_f1"],
        "tasks": {"capitals": {"n": 6}, "sentiment": {"n": 6}},
        # chrf: a metric this script was never told about
        "candidate_metrics": {"capitals": {"exact_match": 0.6667, "token_f1": 0.7, "chrf": 71.2},
                              "sentiment": {"exact_match": 0.8333, "token_f1": 0.8333, "chrf": 88.0}},
        "baseline_metrics": {"capitals": {"exact_match": 0.1667, "token_f1": 0.3, "chrf": 40.0},
                             "sentiment": {"exact_match": 0.0, "token_f1": 0.2, "chrf": 10.5}},
        "regression": regression or {},
        "gate_passed": False, "gate_reasons": ["FAIL retention: general_chat fell 0.50 → 0.25"],
    }


def run(workdir: Path, regression: dict | None = None, **extra_sft) -> dict:
    publish(workdir, "data", "d1", {}, {}, "2026-12-04T19:00:00+00:00", 5)
    publish(workdir, "sft", "s1", {**SFT, **extra_sft}, {"data": {"stage": "data", "key": "d1"}}, "2026-12-04T19:10:00+00:00", 600,
            config={"model": "gguf:sha256:b179", "model_gguf": {"dequantised_from": "Q4_1", "note": "weights dequantised from Q4_1"}})
    publish(workdir, "align", "a1", ALIGN, {"sft": {"stage": "sft", "key": "s1"}}, "2026-12-04T19:20:00+00:00", 300)
    last = publish(workdir, "evaluate", "e1", evaluate_metrics(regression),
                   {"sft": {"stage": "sft", "key": "s1"}, "align": {"stage": "align", "key": "a1"}}, "2026-12-04T19:25:00+00:00", 120)
    return results.lineage(workdir, last)


def test_base_sft_and_aligned_per_task_and_metric(tmp_path):
    table = results.results_markdown(run(tmp_path))
    assert "Base = SmolLM2-135M-Instruct (weights dequantised from Q4_1)" in table
    assert "| capitals | exact match (n=6) | 0.17 | 0.50 | 0.67 |" in table
    assert "| sentiment | token f1 (n=6) | 0.20 | 1.00 | 0.83 |" in table
    assert "| sentiment | chrf (n=6) | 10.50 | — | 88.00 |" in table  # evaluate's metric, unknown to SFT's check
    assert "| `align` all | held-out pairs (n=6): log-likelihood prefers chosen, SFT → aligned | 0.83 → 1.00 |" in table
    assert "**held back**: FAIL retention: general_chat fell 0.50 → 0.25" in table
    assert "regression set" not in table and "retention |" not in table  # no retention set in this run: no row


def test_a_retention_set_and_a_stage_s_retention_figures_appear_when_present(tmp_path):
    regression = {"general_chat": {"candidate": 0.25, "baseline": 0.5, "source": "test split (token_f1)", "n": 8}}
    stages = run(tmp_path, regression, retention={"general_chat": {"base": 0.5, "trained": 0.375}})
    table = results.results_markdown(stages)
    assert "| `evaluate` | regression set general_chat (test split (token_f1), n=8): base → align | 0.50 → 0.25 |" in table
    assert "| `sft` | retention | general_chat.base 0.50, general_chat.trained 0.38 |" in table


def test_the_sft_fallback_and_what_ships_appear_when_the_candidate_was_held_back(tmp_path):
    """A held-back aligned candidate: evaluate's SFT-against-base gate (with its general-set retention) and the
    winner export and deploy take are rows of their own."""
    regression = {"general_chat": {"candidate": 0.25, "baseline": 0.5, "source": "tunepipe general_chat set (contains_answer)", "n": 48}}
    stages = run(tmp_path, regression)
    metrics = stages["evaluate"]["metrics"]
    metrics["fallback"] = {
        "candidate": "sft", "baseline": "base", "gate_passed": True,
        "regression": {"general_chat": {"candidate": 0.4792, "baseline": 0.5, "source": "tunepipe general_chat set (contains_answer)", "n": 48}},
        "gate_reasons": ["PASS max forgetting drop 0.05: worst regression change -0.021 on general_chat (0.500 → 0.479)"],
    }
    metrics.update(winner="sft", winner_reason="align was held back against base (FAIL ...); the sft adapters passed: they ship instead")
    table = results.results_markdown(stages)
    assert ("| `evaluate` | regression set general_chat (tunepipe general_chat set (contains_answer), n=48): base → align | "
            "0.50 → 0.25 |") in table
    assert ("| `evaluate` | regression set general_chat (tunepipe general_chat set (contains_answer), n=48): base → sft | "
            "0.50 → 0.48 |") in table
    assert "| `evaluate` | gate, sft against base | **promoted**: PASS max forgetting drop 0.05: worst regression change -0.021" in table
    assert "| `evaluate` | what export and deploy ship | **sft** (align held back against base; sft passed against base) |" in table
    metrics["fallback"]["gate_passed"] = False
    metrics.update(winner=None, winner_reason="nothing passed")
    assert ("| `evaluate` | what export and deploy ship | **nothing** (align held back against base; sft held back against base) |"
            in results.results_markdown(stages))
    metrics.update(gate_passed=True, winner="align", fallback=None)
    assert "| `evaluate` | what export and deploy ship | **align** (align passed against base) |" in results.results_markdown(stages)


def test_write_then_check_and_times_are_not_checked(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    run(workdir)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.RESULTS_BEGIN}\nold\n{results.RESULTS_END}\n{results.TIMES_BEGIN}\n{results.TIMES_END}\nend\n")
    monkeypatch.setattr(results, "README", readme)
    assert results.main([str(workdir), "--check"]) == 1
    assert results.main([str(workdir), "--write"]) == 0
    assert "| data | sft | align | evaluate | sum |" in readme.read_text() and "| 5 s | 600 s | 300 s | 120 s | 17.1 min |" in readme.read_text()
    # this run's export (it reads sft and align, not evaluate) joins the times; another run's export does not
    publish(workdir, "export", "x-other", {}, {"sft": {"stage": "sft", "key": "s-other"}}, "2026-12-04T19:40:00+00:00", 999)
    publish(workdir, "export", "x1", {}, {"sft": {"stage": "sft", "key": "s1"}, "align": {"stage": "align", "key": "a1"}},
            "2026-12-04T19:30:00+00:00", 60)
    assert results.main([str(workdir), "--write"]) == 0
    assert "| data | sft | align | evaluate | export | sum |" in readme.read_text() and "| 120 s | 60 s | 18.1 min |" in readme.read_text()
    assert results.main([str(workdir), "--check"]) == 0
    manifest = workdir / "artifacts" / "evaluate" / "e1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["timings"]["seconds"] = 999
    manifest.write_text(json.dumps(data))
    assert results.main([str(workdir), "--check"]) == 0
    data["metrics"]["candidate_metrics"]["capitals"]["exact_match"] = 0.5
    manifest.write_text(json.dumps(data))
    assert results.main([str(workdir), "--check"]) == 1


def test_the_committed_readme_has_the_generated_blocks_and_the_data_is_the_generators():
    text = (EXAMPLE / "README.md").read_text()
    block = results.readme_block(text, results.RESULTS_BEGIN, results.RESULTS_END)
    assert block.startswith("Test records, greedy answers.")  # written by results.py --write from a run
    assert "| capitals | exact match (n=6) |" in block and "| sentiment | exact match (n=6) |" in block
    assert "(weights dequantised from Q4_1)" in block
    assert _load("make_data").main(["--check"]) == 0


@pytest.mark.parametrize("name", ["pipeline.yaml"])
def test_the_example_pipeline_validates_when_its_model_is_there(name, tmp_path):
    """The config as shipped, with the GGUF it names present (an empty file stands in: validation only checks it is there)."""
    import shutil

    from tunepipe.tasks.core.config import load_pipeline_config

    example = tmp_path / "real-model"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("models", "runs"))
    (example / "models").mkdir()
    (example / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    config = load_pipeline_config(example / name)
    assert config.sft.model == str(example / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    # The bundled profile for real small models on CPU, not a profile of the example's own.
    assert config.environment == "cpu-small-lm" and sorted(p.name for p in EXAMPLE.glob("*.yaml")) == ["pipeline.yaml"]
    assert config.evaluate.max_examples_per_task == config.sft.heldout.max_examples_per_task  # the columns compare like with like
