"""The benchmark scripts' own logic (no training, no Prefect): config copies, figures, step log."""

from __future__ import annotations

import importlib
import importlib.util
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
    # The steps are kept; the seed is the one the quickstart's top-level `seed:` fills into every stage.
    assert data["pretrain"]["training"] == {"max_steps": 40, "save_steps": 10, "seed": data["seed"]}
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


def _gpu_run(tokens_per_s: float, peak: float, planned_vs_measured: float | None = None) -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_allocated_gb": peak, "mfu": tokens_per_s / 1e5, "mfu_6n": tokens_per_s / 5e4,
            "planned_vs_measured": planned_vs_measured}


def test_gpu_sft_summary_compares_each_side_with_the_baseline_and_with_trl():
    gpu = _load("gpu_sft")
    runs = {
        "0.5b/1024/qlora": {
            "baseline": [_gpu_run(1000, 40.0), _gpu_run(1200, 40.0)],
            "trl": [_gpu_run(20000, 30.0, 1.05)],
            "unsloth": [{"unavailable": "unsloth: ModuleNotFoundError: No module named 'unsloth'"}],
            "tunepipe": [_gpu_run(5000, 20.0, 1.3), {"error": "exit 1", "log_tail": "..."}],  # a failed run is left out
            "liger+packing": [_gpu_run(22000, 27.0, 0.9)],
        },
        "0.5b/1024/lora": {"trl": [_gpu_run(40000, 30.0)], "liger+packing": [_gpu_run(31000, 33.0, 1.1)]},
    }
    summary = gpu.summarise(runs)
    qlora = summary["0.5b/1024/qlora"]
    assert qlora["baseline"]["tokens_per_s"] == 1100  # median of two
    assert qlora["liger+packing"]["speed_vs_trl"] == 1.1 and qlora["liger+packing"]["memory_vs_trl"] == 0.9
    assert qlora["liger+packing"]["speed_vs_baseline"] == 20.0
    assert qlora["unsloth"] == {"unavailable": "unsloth: ModuleNotFoundError: No module named 'unsloth'"}
    # Targets: the fastest tunepipe side; QLoRA MFU >= 20%; >= 1.0x TRL at <= its memory (1.3x the aim); plans within 15%.
    assert qlora["targets"] == {
        "best_tunepipe_variant": "liger+packing", "mfu": 0.22, "mfu_met": True,
        "speed_vs_trl": 1.1, "memory_vs_trl": 0.9, "floor_met": True, "aim_met": False,
        "planned_vs_measured": {"trl": 1.05, "tunepipe": 1.3, "liger+packing": 0.9}, "plan_within_15pct": False,
    }
    lora = summary["0.5b/1024/lora"]["targets"]
    assert lora["mfu"] == 0.31 and lora["mfu_met"] is True  # LoRA's target is 30%
    assert lora["floor_met"] is False and lora["plan_within_15pct"] is True  # slower than TRL, and more memory
    assert "| 0.5b/1024/qlora | liger+packing | 22,000 | 1.1 | 20.0 | 27.0 | 0.9 | 0.9 | 22.0% | 44.0% |" in gpu.table(summary)


def test_gpu_sft_merge_pools_repeats_and_joins_setups_of_separate_calls():
    gpu = _load("gpu_sft")
    setup = {"steps": 20, "models": {"0.5b": {}}, "seq_lengths": [1024], "build_s": 3.0}
    first = {"command": "a", "setup": setup, "runs": {"0.5b/1024/lora": {"baseline": [_gpu_run(1000, 10.0)]}}}
    second = {"command": "b", "setup": {**setup, "build_s": 9.0}, "runs": {"0.5b/1024/lora": {"baseline": [_gpu_run(3000, 10.0)]}}}
    other = {"command": "c", "setup": {**setup, "models": {"1.5b": {}}, "seq_lengths": [4096]},
             "runs": {"1.5b/4096/lora": {"baseline": [_gpu_run(500, 30.0)]}}}
    merged = gpu.merge_results([first, second, other])
    assert merged["merged_from"] == ["a", "b", "c"] and len(merged["runs"]["0.5b/1024/lora"]["baseline"]) == 2
    assert merged["summary"]["0.5b/1024/lora"]["baseline"]["tokens_per_s"] == 2000
    assert merged["summary"]["1.5b/4096/lora"]["baseline"]["tokens_per_s"] == 500
    assert merged["setup"]["models"] == {"0.5b": {}, "1.5b": {}} and merged["setup"]["seq_lengths"] == [1024, 4096]
    assert "| 1.5b/4096/lora | baseline | 500 |" in merged["table"]
    with pytest.raises(SystemExit, match="different setups"):
        gpu.merge_results([first, {**second, "setup": {**setup, "steps": 40}}])


def test_gpu_sft_model_flops_count_the_matmuls_the_adapters_and_attention(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v (2 kv heads of 16), o, gate/up/down
    matmul = 2 * per_block + 64 * 1000  # + the output head
    gpu = _load("gpu_sft")
    assert gpu.model_flops_per_token(str(tmp_path), trainable=500, mean_context=100.0) == 4 * matmul + 6 * 500 + 12 * 2 * 64 * 100
    assert gpu.model_flops_per_token(str(tmp_path), trainable=500, mean_context=100.0, convention="6n") == 6 * matmul + 12 * 2 * 64 * 100


def test_gpu_sft_configs_are_the_real_qwen25_shapes():
    from transformers import Qwen2Config

    from tunepipe.tasks.training.memory_plan import count
    from tunepipe.schemas.sft import SFTConfig

    gpu = _load("gpu_sft")
    full = SFTConfig.model_validate({"method": "full"}).method
    for name, (low, high) in {"0.5b": (0.49e9, 0.5e9), "1.5b": (1.53e9, 1.55e9)}.items():
        arch = {k: v for k, v in gpu.ARCHS[name].items() if k not in ("model_type", "rope_theta")}
        _, total, _ = count(Qwen2Config(**arch), full)
        assert low < total < high, (name, total)


def test_gpu_sft_smoke_runs_every_side_on_a_cpu(tmp_path):
    """The whole benchmark (inputs, every side, figures, planner, summary, table) on a tiny model: the
    script cannot rot between device sessions. LoRA only here (QLoRA: `--smoke` alone, ~1 more minute)."""
    gpu = _load("gpu_sft")
    out = tmp_path / "result.json"
    assert gpu.main(["--smoke", "--methods", "lora", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {side: outcomes[0] for side, outcomes in result["runs"]["tiny/128/lora"].items()}
    assert set(runs) == {"baseline", "trl", "unsloth", "tunepipe", "liger+packing"}
    if importlib.util.find_spec("unsloth") is None:
        assert runs.pop("unsloth")["unavailable"].startswith("unsloth: ModuleNotFoundError")
    for side, run in runs.items():
        assert "error" not in run, (side, run)
        assert run["tokens_per_s"] > 0 and run["steps_timed"] == 2 and run["planned_memory_gb"] > 0, side
        assert run["flops_per_token"] > 0 and run["trainable"] > 0
    # Same rows on every side: the padded sides see the same tokens and reach the same loss; so do the packed ones
    # (TRL configured for speed and tunepipe's packed run), which fill more of each row.
    assert runs["baseline"]["tokens_per_step"] == runs["tunepipe"]["tokens_per_step"]
    assert runs["trl"]["tokens_per_step"] == runs["liger+packing"]["tokens_per_step"] > runs["tunepipe"]["tokens_per_step"]
    assert runs["baseline"]["train_loss"] == pytest.approx(runs["tunepipe"]["train_loss"], abs=1e-3)
    assert runs["trl"]["train_loss"] == pytest.approx(runs["liger+packing"]["train_loss"], abs=1e-3)
    # The plan of the plain Trainer holds its full logits; the others' losses never do.
    assert runs["baseline"]["planned"]["logits_gb"] > runs["tunepipe"]["planned"]["logits_gb"]
    assert "speed_vs_trl" in result["summary"]["tiny/128/lora"]["liger+packing"]
    assert "| tiny/128/lora | trl |" in result["table"]


def test_cpu_memory_plan_rows_fill_max_length_and_the_ratio_is_measured_over_planned():
    bench = _load("cpu_memory_plan")
    assert bench.filler(3, 5) == bench.filler(3, 5) and len(bench.filler(3, 50).split()) == 50  # deterministic rows
    records = bench.sft_records(4, 256)
    assert len(records) == 4 and all(len(r["output"].split()) == 256 for r in records)  # longer than 256 tokens: cut to it
    # RewardTrainer drops pairs over max_length: answers are shortened until both sides fit.
    count = lambda prompt, answer: len(prompt.split()) + len(answer.split())  # noqa: E731  (one token per word)
    pair = bench.fit_pair(bench.preference_pairs(1, 64)[0], count, 64)
    assert max(count(pair["prompt"], pair["chosen"]), count(pair["prompt"], pair["rejected"])) <= 64
    assert count(pair["prompt"], pair["chosen"]) >= 64 - 64 // 20 - 1  # shortened in small steps: rows stay nearly full
    planned = {"weights_gb": 0.5, "logits_gb": 0.25, "overhead_gb": 0.1, "process_gb": 0.55, "total_gb": 1.6, "device_memory_gb": 16}
    row = bench.ratio_row("sft", {"peak_rss_gib": 1.76, "rss_after_imports_gib": 0.5, "steps": 1, "train_s": 3.0}, planned)
    assert row["ratio"] == 1.1 and row["within_15_percent"] is True
    assert row["planned_terms_gib"] == {"weights": 0.5, "logits": 0.25, "overhead": 0.1, "process": 0.55}
    assert bench.ratio_row("dpo", {"peak_rss_gib": 2.0, "rss_after_imports_gib": 0.5, "steps": 1, "train_s": 1.0}, planned)["within_15_percent"] is False
