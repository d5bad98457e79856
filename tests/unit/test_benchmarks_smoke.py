"""The benchmark scripts' own logic (no training, no Prefect): config copies, figures, step log."""

from __future__ import annotations

import importlib
import json

import pytest
import yaml

from tests.conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart" / "pipeline.yaml"


def _load(name: str):
    # benchmarks/ is a plain folder of scripts: imported as a namespace package from the repo root.
    return importlib.import_module(f"benchmarks.{name}")


common = _load("_common")


def test_median_and_ratio():
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert common.median([4.0, 1.0]) == 2.5
    assert common.ratio(10.5, 10.0) == pytest.approx(1.05)
    assert common.ratio(1.0, 0.0) is None
    with pytest.raises(ValueError):
        common.median([])


def _with_training(tmp_path):
    """The quickstart with pretrain and sft sections, whatever the bundled file has today."""
    config = yaml.safe_load(QUICKSTART.read_text())
    for source in config["data"]["sources"]:
        source["path"] = str((QUICKSTART.parent / source["path"]).resolve())
    config["pretrain"] = {"method": "lora", "training": {"max_steps": 40, "save_steps": 10}}
    config["sft"] = {"adapters": "per_task", "method": {"name": "lora", "r": 4}}
    path = tmp_path / "src" / "pipeline.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config))
    return path


def test_bench_config_overrides_every_training_stage_and_stays_valid(tmp_path):
    from tunepipe.tasks.core.config import load_pipeline_config

    path, data = common.bench_config(_with_training(tmp_path), tmp_path / "bench", max_steps=5, save_steps=2, heldout=False)
    assert path == (tmp_path / "bench" / "pipeline.yaml").resolve()
    config = load_pipeline_config(path)
    assert config.workdir == str((tmp_path / "bench" / "workdir").resolve())
    for stage in (config.pretrain, config.sft):
        assert (stage.training.max_steps, stage.training.save_steps) == (5, 2)
    assert config.sft.heldout.max_examples_per_task == 0
    assert config.sft.adapters == "per_task" and config.sft.method.r == 4  # the rest is kept
    assert all(source.path.startswith("/") for source in config.data.sources)
    assert common.training_stages(data) == ["pretrain", "sft"]


def test_bench_config_without_overrides_keeps_the_steps(tmp_path):
    _, data = common.bench_config(_with_training(tmp_path), tmp_path / "bench")
    assert data["pretrain"]["training"] == {"max_steps": 40, "save_steps": 10}
    assert "heldout" not in data["sft"]


def test_a_pipeline_without_training_stages_is_refused(tmp_path):
    _, data = common.bench_config(QUICKSTART, tmp_path / "bench")
    data.pop("pretrain", None), data.pop("sft", None)
    with pytest.raises(SystemExit, match="no pretrain or sft section"):
        common.require_training(data, QUICKSTART)


def _steps(run_steps: dict[str, list[int]], max_steps: dict[str, int]) -> list:
    return [common.Step("sft", run, s, max_steps[run], float(i)) for run in run_steps for i, s in enumerate(run_steps[run])]


def test_step_log_round_trip_skips_a_torn_line(tmp_path):
    log = tmp_path / "steps.jsonl"
    rows = [{"stage": "sft", "run": "a", "step": 1, "max_steps": 4, "t": 1.0}, {"stage": "pretrain", "run": "run", "step": 1, "max_steps": 2, "t": 2.0}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "sft", "ru')
    assert common.read_step_log(log, "sft") == [common.Step("sft", "a", 1, 4, 1.0)]
    assert len(common.read_step_log(log)) == 2
    assert common.read_step_log(tmp_path / "absent.jsonl") == []


def test_cumulative_steps_and_recomputed_steps_across_per_task_runs():
    max_steps = {"triples": 10, "sentiment": 10}
    killed = _steps({"triples": list(range(1, 11)), "sentiment": [1, 2, 3, 4]}, max_steps)
    order = common.run_order(killed)
    assert order == max_steps
    assert common.cumulative_step(killed[-1], order) == 14
    # Resumed from checkpoint-3 of sentiment: step 4 again, then the rest; triples not retrained.
    resumed = _steps({"sentiment": list(range(4, 11))}, max_steps)
    assert common.recomputed_steps(killed, resumed) == {"sentiment": 1}
    # Started over: every completed step is recomputed.
    assert common.recomputed_steps(killed, _steps({"sentiment": list(range(1, 11))}, max_steps)) == {"sentiment": 4}


def test_kill_target_is_inside_the_run():
    resume = _load("resume")
    assert resume.kill_target({"all": 10}, 0.7) == 7
    assert resume.kill_target({"a": 5, "b": 5}, 0.99) == 9
    assert resume.kill_target({"all": 3}, 0.01) == 1
    with pytest.raises(SystemExit, match="too few"):
        resume.kill_target({"all": 1}, 0.7)


def test_cached_rerun_flags_recomputed_and_rekeyed_stages():
    cached = _load("cached_rerun")
    first = {"stages": {"data": {"key": "k1", "cached": False}, "sft": {"key": "k2", "cached": False}}}
    ok = {"stages": {"data": {"key": "k1", "cached": True}, "sft": {"key": "k2", "cached": True}}}
    bad = {"stages": {"data": {"key": "k1", "cached": False}, "sft": {"key": "k3", "cached": True}}}
    assert cached.check_cached(first, ok) == []
    assert cached.check_cached(first, bad) == ["data: recomputed", "sft: key changed k2 -> k3"]


def test_parsers_take_a_config_and_step_overrides():
    for name in ("orchestration_overhead", "cached_rerun", "resume"):
        args = _load(name).build_parser().parse_args(["my.yaml", "--max-steps", "5", "--repeats", "1"])
        assert (args.config, args.max_steps, args.repeats) == ("my.yaml", 5, 1)
        assert _load(name).build_parser().parse_args([]).config == str(QUICKSTART)


def test_overhead_summary_is_the_median_of_per_pair_ratios():
    overhead = _load("orchestration_overhead")
    pairs = [
        {"tunepipe": {"stages_s": t, "train_s": t / 2, "startup_s": 10.0, "wall_s": t + 10},
         "script": {"stages_s": s, "train_s": s / 2, "import_s": 3.0, "work_s": s - 3}}
        for t, s in ((10.0, 10.0), (12.0, 10.0), (30.0, 10.0))
    ]
    summary = overhead.summarize(pairs)
    assert summary["stage_ratio_median"] == 1.2
    assert summary["train_loop_ratio_median"] == 1.2
    assert summary["startup_s_median"] == 10.0
    assert summary["meets_target"] is False


def _gpu_run(tokens_per_s: float, peak: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_allocated_gb": peak, "mfu": tokens_per_s / 1e6}


def test_gpu_sft_summary_compares_each_variant_with_its_method_baseline():
    gpu = _load("gpu_sft")
    runs = {
        "qlora": {
            "baseline": [_gpu_run(1000, 40.0), _gpu_run(1200, 40.0)],
            "packing": [_gpu_run(3300, 36.0), _gpu_run(3300, 36.0)],
            "liger": [_gpu_run(1400, 44.0), {"error": "exit 1", "log_tail": "..."}],  # a failed run is left out
        },
        "lora": {"baseline": [_gpu_run(2000, 30.0)], "tunepipe": [_gpu_run(1000, 15.0)]},
    }
    summary = gpu.summarise(runs)
    assert summary["qlora"]["baseline"]["tokens_per_s"] == 1100  # median of two
    assert summary["qlora"]["packing"]["speed_vs_baseline"] == 3.0
    assert summary["qlora"]["packing"]["memory_vs_baseline"] == 0.9
    assert summary["lora"]["tunepipe"]["speed_vs_baseline"] == 0.5
    # The target: the fastest QLoRA variant at >= 1.5x the baseline's tokens/s and <= its peak memory.
    assert summary["qlora_target"] == {"best_variant": "packing", "speed_vs_baseline": 3.0, "memory_vs_baseline": 0.9, "met": True}
    runs["qlora"]["packing"] = [_gpu_run(3300, 44.0)]
    assert gpu.summarise(runs)["qlora_target"]["met"] is False  # faster, but more memory than the baseline


def test_gpu_sft_merge_pools_runs_of_the_same_setup_only():
    gpu = _load("gpu_sft")
    setup = {"steps": 20, "max_length": 1024, "build_s": 3.0}
    first = {"command": "a", "setup": setup, "runs": {"lora": {"baseline": [_gpu_run(1000, 10.0)]}}}
    second = {"command": "b", "setup": {**setup, "build_s": 9.0}, "runs": {"lora": {"baseline": [_gpu_run(3000, 10.0)]}}}
    merged = gpu.merge_results([first, second])
    assert merged["merged_from"] == ["a", "b"] and len(merged["runs"]["lora"]["baseline"]) == 2
    assert merged["summary"]["lora"]["baseline"]["tokens_per_s"] == 2000
    with pytest.raises(SystemExit, match="different setups"):
        gpu.merge_results([first, {**second, "setup": {**setup, "steps": 40}}])


def test_gpu_sft_model_flops_count_the_matmuls_the_adapters_and_attention(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v (2 kv heads of 16), o, gate/up/down
    matmul = 2 * per_block + 64 * 1000  # + the output head
    flops = _load("gpu_sft").model_flops_per_token(str(tmp_path), trainable=500, mean_context=100.0)
    assert flops == 4 * matmul + 6 * 500 + 12 * 2 * 64 * 100
