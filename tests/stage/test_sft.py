"""The sft stage: loss masks on real batches, templates, truncation accounting, packing,
per-task adapters and the artifact's contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.sft import NAMED_CHAT_TEMPLATES, SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.lm.encoding import IGNORE
from tunepipe.tasks.sft.train import prepare_sft, sft_trainer
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    return {
        "model": build_tiny_model(root / "llama"),
        "data": write_data_artifact(root / "data"),
        "long": write_data_artifact(root / "data-long", long_record=True),
    }


def _job(assets, tmp_path, data="data", **overrides) -> dict:
    config = {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 96,
              "training": {"max_steps": 2, "warmup_ratio": 0.0}, **overrides}
    return {
        "config": SFTConfig.model_validate(config).model_dump(mode="json"),
        "env": cpu_profile().model_dump(mode="json"), "model_path": str(assets["model"]),
        "data_dir": assets[data].path, "tasks": None, "output_dir": str(tmp_path), "save_to": "out",
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }


def _first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_completion_only_loss_on_a_real_batch(assets, tmp_path):
    trainer, prepared = sft_trainer(_job(assets, tmp_path))
    tokenizer = prepared["tokenizer"]
    batch = _first_batch(trainer)
    assert batch["labels"].shape == batch["input_ids"].shape
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        real = labels != IGNORE
        assert real.any() and (~real).any()
        text = tokenizer.decode(ids, skip_special_tokens=False)
        target = tokenizer.decode(ids[real], skip_special_tokens=False)
        prompt_end = text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
        prompt_ids = tokenizer(text[:prompt_end], add_special_tokens=False)["input_ids"]
        # Every prompt position (system, user turn, the assistant header) carries -100 ...
        assert (labels[: len(prompt_ids)] == IGNORE).all()
        # ... and the labelled tokens are exactly the answer and its end-of-turn token.
        assert target.startswith(text[prompt_end:].split("<|im_end|>")[0])
        assert "<|im_end|>" in target and "Classify" not in target and "user" not in target


def test_train_on_inputs_puts_loss_on_prompts_too(assets, tmp_path):
    trainer, _ = sft_trainer(_job(assets, tmp_path, train_on_inputs=True))
    batch = _first_batch(trainer)
    assert ((batch["labels"] == IGNORE) == (batch["attention_mask"] == 0)).all()


@pytest.mark.parametrize("template", ["alpaca", "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"])
def test_named_and_explicit_templates(assets, tmp_path, template):
    prepared = prepare_sft(_job(assets, tmp_path, chat_template=template))
    tokenizer = prepared["tokenizer"]
    row = prepared["train_rows"][0]
    target = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    text = tokenizer.decode(row["input_ids"])
    assert ("### Instruction:" in text) == (template == "alpaca")
    assert target.strip().endswith("<|im_end|>") and "Instruction" not in target and "<user>" not in target
    assert tokenizer.chat_template == NAMED_CHAT_TEMPLATES.get(template, template)  # saved with the result


def test_truncation_is_counted_never_silent(assets, tmp_path):
    prepared = prepare_sft(_job(assets, tmp_path, data="long", max_length=40))
    stats = prepared["train_stats"]
    assert stats.truncated + stats.dropped_no_target >= 1
    assert all(len(r["input_ids"]) <= 40 for r in prepared["train_rows"])
    dropped = prepare_sft(_job(assets, tmp_path, data="long", max_length=40, overlong="drop"))["train_stats"]
    assert dropped.dropped_overlong >= 1 and dropped.truncated == 0
    with pytest.raises(StageFailed, match="longer than max_length 40"):
        prepare_sft(_job(assets, tmp_path, data="long", max_length=40, overlong="fail"))


def test_packing_keeps_examples_apart(assets, tmp_path):
    trainer, prepared = sft_trainer(_job(assets, tmp_path, packing=True))
    batch = _first_batch(trainer)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    positions = batch["position_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2, "several examples share the packed row"
    model = trainer.model.eval()
    b = starts[1]
    second = batch["input_ids"][0, b : starts[2] if len(starts) > 2 else None]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, b : b + len(second)]
        alone = model(input_ids=second[None]).logits[0]
    # No cross-example attention: the second example's logits do not depend on the first.
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_per_task_adapters_artifact(assets, tmp_path):
    config = SFTConfig.model_validate(
        {"model": str(assets["model"]), "method": "lora", "adapters": "per_task", "max_length": 96,
         "training": {"max_steps": 2, "warmup_ratio": 0.0}}
    )
    store = ArtifactStore(tmp_path / "artifacts")
    ref = run_stage(SFTStage(), config, {"data": assets["data"]}, store, cpu_profile())
    root = Path(ref.path)
    outputs = json.loads((root / "outputs.json").read_text())
    assert outputs["kind"] == "adapters" and outputs["paths"] == {"count": "adapters/count", "sentiment": "adapters/sentiment"}
    for task in ("count", "sentiment"):
        assert (root / "adapters" / task / "adapter_config.json").exists()
        assert (root / "adapters" / task / "adapter_model.safetensors").exists()
        assert (root / "adapters" / task / "tokenizer.json").exists()
    assert (root / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((root / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["global_step"] == {"count": 2, "sentiment": 2}
    assert m["trainable_parameters"] > 0 and m["truncated"] == 0
    assert set(m["loss_history"]) == {"count", "sentiment"} and len(m["loss_history"]["count"]) == 2
    assert all(v > 0 for v in m["tokens_per_second"].values()) and m["peak_memory_gb"] > 0
    assert manifest["environment"]["per_device_batch_size"] == 4
    table = json.loads((root / "summary_table.json").read_text())
    assert {row["run"] for row in table} == {"count", "sentiment"}
    assert run_stage(SFTStage(), config, {"data": assets["data"]}, store, cpu_profile()).cached
