"""The CLI on the bundled quickstart, as a user runs it: first run, cached rerun, partial reruns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

QUICKSTART = REPO / "examples" / "quickstart" / "pipeline.yaml"


def tunepipe(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "tunepipe.flows.cli.main", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tunepipe {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def run_json(*args: str, cwd: Path) -> dict:
    proc = tunepipe("run", *args, "--json", cwd=cwd)
    # With --json, stdout is exactly one JSON document (jq can read it); the rest went to stderr.
    return json.loads(proc.stdout)


def portable_copy(tmp_path: Path, **section_updates) -> Path:
    """The quickstart YAML with absolute source paths, so it can live elsewhere and be edited."""
    config = yaml.safe_load(QUICKSTART.read_text())
    for source in config["data"]["sources"]:
        source["path"] = str((QUICKSTART.parent / source["path"]).resolve())
    for section, updates in section_updates.items():
        config[section].update(updates)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


FIRST_CONSOLE: list[str] = []  # the first run's console (stderr: with --json, everything but the summary)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    # Bytes, decoded without newline translation: text mode turns a progress bar's every `\r` redraw
    # into a line of its own, which a terminal never shows. The run sees a user's environment: the test
    # session's PREFECT_HOME and PREFECT_LOGGING_LEVEL=WARNING (conftest, for in-process tests) would put the
    # run's Prefect state outside its workdir and keep the training loss lines out of its run log.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFECT_LOGGING_LEVEL", "PREFECT_HOME")}
    proc = subprocess.run([sys.executable, "-m", "tunepipe.flows.cli.main", "run", "--json"], cwd=cwd, env=env,
                          capture_output=True, timeout=600)
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, stderr[-4000:]
    FIRST_CONSOLE.append(stderr)
    return cwd, json.loads(proc.stdout)


STAGES = ["data", "base_model", "sft", "reward", "align", "evaluate", "export", "deploy"]


def test_first_run_computes_every_stage(first_run):
    cwd, summary = first_run
    assert summary["workdir"] == str((cwd / "runs" / "quickstart").resolve())
    assert list(summary["stages"]) == STAGES
    for name, stage in summary["stages"].items():
        assert stage["cached"] is False
        assert Path(stage["path"]) == Path(summary["workdir"]) / "artifacts" / name / stage["key"]
        assert (Path(stage["path"]) / "manifest.json").is_file()
    data = summary["stages"]["data"]["metrics"]
    assert data["read"] == data["kept"] + data["rejected"] and data["rejected"] > 0
    assert summary["stages"]["base_model"]["metrics"]["num_parameters"] > 0
    assert len(summary["run_id"]) == 36


def test_sft_trains_per_task_adapters_that_beat_the_base(first_run):
    _, summary = first_run
    sft = summary["stages"]["sft"]
    assert sft["metrics"]["kind"] == "adapters" and sorted(sft["metrics"]["runs"]) == ["sentiment", "triples"]
    heldout = sft["metrics"]["heldout"]
    # A clear margin on each task's metric: exact match for the labels, token F1 for the triples.
    assert heldout["sentiment"]["exact_match"] >= heldout["sentiment"]["base_exact_match"] + 0.5
    assert heldout["triples"]["token_f1"] >= heldout["triples"]["base_token_f1"] + 0.1
    # A policy sharp enough for preference and RL signals: the sentiment answers' validation loss
    # (about 4.5 when the initialisation capped the logits and the policy stayed near uniform).
    assert sft["metrics"]["eval_loss"]["sentiment"] < 0.5
    for task in ("sentiment", "triples"):
        assert (Path(sft["path"]) / "adapters" / task / "adapter_model.safetensors").is_file()


def test_reward_and_dpo_improve_their_objectives_within_tolerance(first_run):
    _, summary = first_run
    reward = summary["stages"]["reward"]["metrics"]
    assert reward["heldout_accuracy"] >= 0.6 and reward["heldout_accuracy"] > reward["heldout_accuracy_before"]
    align = summary["stages"]["align"]["metrics"]
    assert align["method"] == "dpo" and align["task_metric_within_tolerance"] is True
    for task, heldout in align["heldout"].items():
        # DPO's own objective on held-out pairs: the aligned policy moved chosen above rejected
        # relative to the SFT policy (its implicit reward) on most pairs.
        assert heldout["preferences"]["implicit_reward_accuracy"] > 0.5, task
        assert heldout["preferences"]["implicit_reward_margin"] > 0, task
        assert heldout["preferences"]["aligned_accuracy"] >= heldout["preferences"]["sft_accuracy"], task
        assert heldout["task"]["task_metric_drop"] <= align["task_tolerance"], task


def test_grpo_with_a_verifiable_reward_raises_it_on_held_out_prompts(first_run, tmp_path):
    """examples/quickstart/align_grpo.yaml in place of DPO: GRPO on the triples adapter, rewarded by token F1 and the
    triple format against the references. On the test split's prompts, the reward it optimised rises for its samples
    (temperature 0.5, 4 per prompt, the same seeded draws for SFT and aligned), and its greedy answers keep the task
    metric within tolerance. Costs one align stage (~2 min); the stages before it are the first run's, cached."""
    cwd, first = first_run
    path = portable_copy(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["align"] = yaml.safe_load((QUICKSTART.parent / "align_grpo.yaml").read_text())["align"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    summary = run_json(str(path), "--until", "align", "--workdir", first["workdir"], cwd=cwd)
    assert [name for name, s in summary["stages"].items() if not s["cached"]] == ["align"]
    align = summary["stages"]["align"]["metrics"]
    assert align["method"] == "grpo" and align["checks"]["triples"]["reward_moved"]["passed"]
    task = align["heldout"]["triples"]["task"]
    sampled, greedy = task["sampled_rule_rewards"]["token_f1"], task["rule_rewards"]["token_f1"]
    # Measured with training seeds 42 (this config's), 1 and 2: sampled 0.249 -> 0.394, 0.250 -> 0.386, 0.279 -> 0.378;
    # greedy 0.391 -> 0.417, 0.396, 0.385. The samples' reward rises with every seed, the greedy answers' only with some.
    assert sampled["aligned"] >= sampled["sft"] + 0.05, sampled
    assert task["task_metric_within_tolerance"] is True and greedy["sft"] - greedy["aligned"] <= align["task_tolerance"], greedy
    verdict = align["verdict"]["triples"]
    assert verdict["sampled_objective"]["aligned"] > verdict["sampled_objective"]["sft"]
    assert verdict["better_than_sft"] == verdict["objective_improved"], verdict  # within tolerance: the objective decides


def test_gate_compares_aligned_with_sft_and_deploy_registers_the_adapters(first_run):
    _, summary = first_run
    evaluate = summary["stages"]["evaluate"]["metrics"]
    # What a team decides between: the aligned adapters or the SFT adapters they came from.
    assert (evaluate["candidate"], evaluate["baseline"], evaluate["ab"]["judge"]) == ("align", "sft", "reward_model")
    assert evaluate["gate_passed"] is True and evaluate["win_rate_ci_low"] > 0.5
    assert any("CI [" in reason for reason in evaluate["gate_reasons"])  # the interval is stated
    # Preferred by the reward model and no task metric lower than SFT's beyond the limits.
    assert any(r.startswith("PASS max task metric drop") for r in evaluate["gate_reasons"])
    assert any(r.startswith("PASS align kept token_f1") for r in evaluate["gate_reasons"])
    assert (Path(summary["stages"]["evaluate"]["path"]) / "report.html").is_file()
    export = summary["stages"]["export"]["metrics"]
    assert export["merged_agreement"] == {"sentiment": 1.0, "triples": 1.0}
    deploy = summary["stages"]["deploy"]["metrics"]
    assert deploy["decision"] == "promoted"
    assert sorted(deploy["serving"]) == ["quickstart-sentiment", "quickstart-triples"]


def test_quickstart_readme_results_are_this_run(first_run):
    """examples/quickstart/README.md's results table is what results.py writes from a fresh run's
    manifests: the documented numbers are the ones the quickstart produces."""
    from tunepipe.examples.quickstart import results

    _, summary = first_run
    workdir = Path(summary["workdir"])
    stages = results.lineage(workdir, Path(summary["stages"]["evaluate"]["path"]))
    assert sorted(stages) == sorted(set(STAGES) - {"export", "deploy"})
    assert results.results_markdown(stages) == results.readme_block(results.README.read_text()), (
        "examples/quickstart/README.md is stale: python examples/quickstart/results.py runs/quickstart --write"
    )
    assert results.main([str(workdir), "--check"]) == 0  # the CLI finds the same run on its own


TRAINING_STAGES = ["base_model", "sft", "reward", "align"]


def weight_files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_a_fresh_workdir_gives_the_same_keys_and_weights(first_run, tmp_path):
    """Same key, same bytes: every training stage of a second quickstart, in another workdir and
    process, publishes the keys and weight files of the first."""
    _, first = first_run
    second = run_json("--until", "align", cwd=tmp_path)
    assert second["workdir"] != first["workdir"]
    for name in ["data", *TRAINING_STAGES]:
        assert second["stages"][name]["cached"] is False
        assert second["stages"][name]["key"] == first["stages"][name]["key"], name
    for name in TRAINING_STAGES:
        weights = weight_files(first["stages"][name]["path"])
        assert weights and weight_files(second["stages"][name]["path"]) == weights, name


def test_unchanged_rerun_reports_every_stage_cached(first_run):
    cwd, first = first_run
    proc = tunepipe("run", "--json", cwd=cwd)
    # Every run log reached the run's own Prefect server before it stopped (no lost lines).
    assert "Error logging to API" not in proc.stderr
    second = json.loads(proc.stdout)
    assert second["run_id"] != first["run_id"]
    assert {name: s["cached"] for name, s in second["stages"].items()} == {name: True for name in STAGES}
    assert {n: s["key"] for n, s in second["stages"].items()} == {n: s["key"] for n, s in first["stages"].items()}
    assert second["stages"]["data"]["metrics"] == first["stages"]["data"]["metrics"]


def test_downstream_change_reruns_only_downstream(first_run, tmp_path):
    cwd, first = first_run
    workdir = first["workdir"]
    changed = run_json(str(portable_copy(tmp_path, deploy={"smoke": {"max_tokens": 8}})), "--workdir", workdir, cwd=cwd)
    assert [name for name, s in changed["stages"].items() if not s["cached"]] == ["deploy"]
    assert {n: s["key"] for n, s in changed["stages"].items() if n != "deploy"} == {
        n: s["key"] for n, s in first["stages"].items() if n != "deploy"
    }
    assert changed["stages"]["deploy"]["key"] != first["stages"]["deploy"]["key"]
    # The same adapters are already serving: nothing new is registered or promoted.
    assert changed["stages"]["deploy"]["metrics"]["registered"] == first["stages"]["deploy"]["metrics"]["registered"]


def test_until_and_from(first_run):
    cwd, first = first_run
    until = run_json("--until", "data", cwd=cwd)
    assert list(until["stages"]) == ["data"] and until["stages"]["data"]["cached"] is True
    refreshed = run_json("--from", "export", cwd=cwd)
    assert all(refreshed["stages"][name]["cached"] for name in STAGES[: STAGES.index("export")])
    for name in ("export", "deploy"):
        assert refreshed["stages"][name]["cached"] is False
        assert refreshed["stages"][name]["key"] == first["stages"][name]["key"]


def test_config_error_exits_2_naming_the_field(tmp_path):
    path = portable_copy(tmp_path)
    path.write_text(path.read_text() + "sft_typo: {}\n")
    proc = tunepipe("run", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "sft_typo" in proc.stderr and "unknown key" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    test_command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert test_command in readme, "README's test command and .ci/run have drifted apart"


def test_data_gate_failure_names_expectation_count_and_rejected_file(tmp_path):
    path = portable_copy(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["data"]["max_rejected_fraction"] = 0.01
    config["workdir"] = str(tmp_path / "work")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = tunepipe("run", str(path), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    message = proc.stderr.split("tunepipe: stage failed:")[-1]
    assert "max_rejected_fraction" in message and "rejected.jsonl" in message
    rejected = next(Path(tmp_path / "work" / "artifacts" / "data" / ".staging").glob("*/rejected.jsonl"))
    assert rejected.read_text().count("\n") > 0
    assert not [p for p in (tmp_path / "work" / "artifacts" / "data").iterdir() if not p.name.startswith(".")]


def test_first_run_console_is_short_and_the_run_log_holds_the_training_losses(first_run):
    """Without --verbose: at most ~100 console lines (as a terminal shows them: a progress bar redraws
    its line with \\r), none of them the Trainer's per-step dicts; the per-step losses are in the Prefect
    run log instead, the last of each job equal to the manifest's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tunepipe.tasks.core.net import free_port
    from tunepipe.tasks.ops.prefect_server import LocalStack

    cwd, summary = first_run
    lines = FIRST_CONSOLE[0].split("\n")
    assert len(lines) <= 100, "\n".join(lines)
    assert not any("{'loss'" in line for line in lines)
    assert any("sft/sentiment: " in line and "loss=" in line for line in lines)  # the job's progress line (\r-redrawn)

    history = summary["stages"]["sft"]["metrics"]["loss_history"]
    stack = LocalStack(prefect_home=Path(summary["workdir"]) / ".prefect", port=free_port(),
                       env_extra={"PREFECT_UI_ENABLED": "false"})
    try:
        stack.start_server(timeout=150)
        with temporary_settings(updates={PREFECT_API_URL: stack.url}), get_client(sync_client=True) as client:
            logs, offset = [], 0
            while batch := client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["run_id"]])),
                                            limit=200, offset=offset):
                logs, offset = logs + batch, offset + len(batch)
    finally:
        stack.stop()
    for task, points in history.items():
        ours = [log.message for log in logs if log.name == "tunepipe.metrics" and log.message.startswith(f"sft/{task} step ")]
        assert len(ours) >= 2, [log.message for log in logs][:50]
        assert ours[-1].startswith(f"sft/{task} step {points[-1]['step']}/") and f": loss {points[-1]['loss']:.4f}" in ours[-1]
