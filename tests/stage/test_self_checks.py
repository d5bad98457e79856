"""A stage proves its own result before it publishes: each self-check, with a planted failure.

sft: steps not all run, an empty label mask, labels on prompt tokens, a NaN loss, a loss that
never moves, a saved adapter that changes nothing. export: a merged model that lost the adapter.
Each failure names its check; the passing run records every check in the manifest's metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage
from tests.helpers.training import build_tiny_model, cpu_profile, plant_loss, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("self-checks")
    return {"root": root, "model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def _sft(assets, tmp_path, self_checks=None, **training):
    config = SFTConfig.model_validate({
        "model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 64,
        "heldout": {"max_examples_per_task": 0}, "self_checks": self_checks or {},
        "training": {"max_steps": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "save_steps": 100, **training},
    })
    return run_stage(SFTStage(), config, {"data": assets["data"]}, ArtifactStore(tmp_path / "artifacts"), cpu_profile())


def test_passing_run_records_every_check(assets, tmp_path):
    ref = _sft(assets, tmp_path)
    checks = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["checks"]["all"]
    assert checks["steps"] == {"passed": True, "global_step": 4, "requested": 4}
    assert checks["loss"]["passed"] and checks["loss"]["finite"] and checks["loss"]["moved"]
    assert checks["label_mask"]["passed"] and checks["label_mask"]["rows"] > 0
    assert checks["adapter_effect"]["passed"] and checks["adapter_effect"]["max_logit_difference"] > 0


def test_steps_that_did_not_all_run(assets, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from tunepipe.tasks.training import trainer as trainer_module

    class StopEarly(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2

    original = trainer_module.make_callbacks
    monkeypatch.setattr(trainer_module, "make_callbacks", lambda *a, **k: [*original(*a, **k), StopEarly()])
    with pytest.raises(StageFailed, match=r"self-check steps failed: the trainer ran 2 optimizer steps of the 4 requested "
                       r"\(to publish anyway, set sft.self_checks.steps: warn\)"):
        _sft(assets, tmp_path)
    # Set to warn, the same run publishes, and its manifest says what was waived.
    ref = _sft(assets, tmp_path, self_checks={"steps": "warn"})
    steps = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["checks"]["all"]["steps"]
    assert steps["passed"] is False and steps["global_step"] == 2
    assert steps["warned"] == "the trainer ran 2 optimizer steps of the 4 requested"
    summary = (Path(ref.path) / "summary.md").read_text()
    assert "**warning** (self-check steps, all, configured to warn): the trainer ran 2 optimizer steps of the 4 requested" in summary


@pytest.mark.parametrize("spans, reason", [
    (lambda text: [], "no token is labeled"),
    (lambda text: [(0, len(text))], "labels cover prompt"),
])
def test_label_mask_empty_or_covering_the_prompt(assets, tmp_path, monkeypatch, spans, reason):
    from tunepipe.tasks.lm import encoding

    monkeypatch.setattr(encoding, "_turn_spans", lambda tokenizer, template, messages, text: (spans(text), []))
    with pytest.raises(StageFailed, match=rf"self-check label_mask failed: train record \S+: {reason}"):
        _sft(assets, tmp_path)


@pytest.mark.parametrize("planted, reason", [
    (lambda loss: loss * float("nan"), "the training loss is not finite"),
    (lambda loss: loss * 0 + 1.0, "the training loss is constant"),
])
def test_loss_nan_or_never_moving(assets, tmp_path, monkeypatch, planted, reason):
    from trl import SFTTrainer

    plant_loss(monkeypatch, SFTTrainer, planted)
    with pytest.raises(StageFailed, match=f"self-check loss failed: {reason}"):
        _sft(assets, tmp_path)


def test_saved_adapter_that_changes_nothing(assets, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from tunepipe.tasks.sft import train

    original = train.save_result

    def save_empty(trainer, tokenizer, method, dest, initial_adapter):
        original(trainer, tokenizer, method, dest, initial_adapter)
        weights = load_file(dest / "adapter_model.safetensors")
        save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, dest / "adapter_model.safetensors")

    monkeypatch.setattr(train, "save_result", save_empty)
    with pytest.raises(StageFailed, match=r"self-check adapter_effect failed: the saved adapter does not change the model's output"):
        _sft(assets, tmp_path)


def test_export_merged_model_that_lost_the_adapter(assets, tmp_path, monkeypatch):
    from tunepipe.tasks.export import stage as export_stage

    sft = _sft(assets, tmp_path, max_steps=6)
    original = export_stage.save_merged
    monkeypatch.setattr(export_stage, "save_merged", lambda reference, tokenizer, dest: original(reference.unload(), tokenizer, dest))
    config = ExportConfig.model_validate({"targets": ["merged"], "reeval": {"max_examples_per_task": 2, "max_new_tokens": 4}})
    with pytest.raises(StageFailed, match=r"self-check merged_matches_adapter failed: export: run all"):
        run_stage(ExportStage(), config, {"sft": sft, "data": assets["data"]}, ArtifactStore(tmp_path / "artifacts"), cpu_profile())
    monkeypatch.setattr(export_stage, "save_merged", original)
    ref = run_stage(ExportStage(), config, {"sft": sft, "data": assets["data"]}, ArtifactStore(tmp_path / "artifacts"), cpu_profile())
    check = json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]["checks"]["merged_matches_adapter"]["all"]
    assert check["passed"] and check["max_logit_difference"] < 1e-4
