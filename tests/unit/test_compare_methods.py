"""`tunepipe compare-methods`: the sft variant each method trains, the vLLM verdict, the table,
and config errors before anything trains. (The measured run itself: README, `--out`.)"""

from __future__ import annotations

import json

from tunepipe.flows.cli.main import main
from tunepipe.tasks.ops.compare_methods import markdown_table, method_label, sft_variant, vllm_verdict
from tunepipe.tasks.core.config import load_pipeline_config


def test_each_method_trains_the_pipelines_sft_section_with_one_shared_run(tmp_path):
    config = load_pipeline_config(None, workdir=str(tmp_path))
    sft = sft_variant(config, {"name": "adapter", "placement": "parallel"}, 7, 3)
    assert sft.method.name == "adapter" and sft.method.placement == "parallel"
    assert sft.adapters == "shared" and sft.training.max_steps == 7 and sft.heldout.max_examples_per_task == 3
    # Everything else is the pipeline's: data handling, length, seed, learning rate.
    assert (sft.max_length, sft.training.seed, sft.training.learning_rate) == (
        config.sft.max_length, config.sft.training.seed, config.sft.training.learning_rate)
    assert method_label({"name": "adapter", "placement": "parallel"}) == "adapter(placement=parallel)"


def _artifact(path, kind, cfg=None):
    path.mkdir(parents=True)
    outputs = {"kind": kind, "method": "lora" if kind == "adapter" else "full", "base_model": "base" if kind == "adapter" else None,
               "paths": {"all": "adapter" if kind == "adapter" else "model"}}
    (path / "outputs.json").write_text(json.dumps(outputs))
    if cfg is not None:
        (path / "adapter").mkdir()
        (path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def test_vllm_verdict_is_exports_check(tmp_path):
    assert vllm_verdict(_artifact(tmp_path / "lora", "adapter", {"peft_type": "LORA", "r": 8})) == "yes"
    assert vllm_verdict(_artifact(tmp_path / "full", "model")) == "yes (full weights)"
    verdict = vllm_verdict(_artifact(tmp_path / "mam", "adapter", {"peft_type": "BOTTLENECK", "prefix_length": 4}))
    assert verdict == "no: a bottleneck adapter (MAM Adapter)"


def test_table_has_one_row_per_method_and_a_column_per_task():
    row = {"method": "lora", "trainable_parameters": 1234, "trainable_percent": 1.5, "peak_memory_gb": 0.7, "planned_memory_gb": 0.01,
           "step_seconds": 0.2, "train_loss": 2.5, "heldout": {"a": {"exact_match": 0.5, "token_f1": 0.75}}, "latency_added_percent": 12.0,
           "vllm": "yes"}
    table = markdown_table([row, {**row, "method": "ia3", "heldout": {}}]).splitlines()
    assert len(table) == 4 and "a EM / F1" in table[0]
    assert "| `lora` | 1,234 (1.50%) |" in table[2] and "0.50 / 0.75" in table[2] and "+12%" in table[2]
    assert "| - |" in table[3]


def test_bad_methods_are_config_errors_before_anything_trains(tmp_path, capsys):
    assert main(["compare-methods", "--workdir", str(tmp_path), "--methods", "lora", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert main(["compare-methods", "--workdir", str(tmp_path), "--methods", "{bad json"]) == 2
    assert not (tmp_path / "artifacts").exists()
