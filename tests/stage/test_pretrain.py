"""The pretrain stage: packed continued pretraining on the corpus, published as a full model
directory that the sft stage takes as its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.pretrain.stage import PretrainStage
from tunepipe.tasks.pretrain.train import split_corpus
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.core.stage import run_stage
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    return {"model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def _weights(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict())


def test_split_is_stable_by_id():
    records = [{"id": f"d{i}", "text": f"text {i}"} for i in range(200)]
    train, val = split_corpus(records, 0.1)
    assert len(train) + len(val) == 200 and 5 < len(val) < 40
    assert split_corpus(records[:100], 0.1)[1] == [t for t in val if int(t.split()[1]) < 100]


@pytest.mark.parametrize("method", ["full", {"name": "lora", "r": 4}])
def test_pretrain_publishes_a_model_sft_can_start_from(assets, tmp_path, method):
    config = PretrainConfig.model_validate(
        {"model": str(assets["model"]), "method": method, "max_length": 24, "validation_fraction": 0.2,
         "training": {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0}}
    )
    store = ArtifactStore(tmp_path / "artifacts")
    ref = run_stage(PretrainStage(), config, {"data": assets["data"]}, store, cpu_profile(per_device_batch_size=2))
    root = Path(ref.path)
    assert (root / "config.json").exists() and (root / "model.safetensors").exists() and (root / "tokenizer.json").exists()
    assert not (root / "adapter_config.json").exists()  # LoRA is merged into the weights
    assert (root / "loss_curve.png").exists()
    metrics = json.loads((root / "manifest.json").read_text())["metrics"]
    assert metrics["global_step"] == 3 and len(metrics["loss_history"]) == 3
    assert metrics["blocks"] < metrics["documents"], "documents are packed together"
    assert metrics["truncated"] == 0 and metrics["eval_perplexity"] > 1
    before, after = _weights(assets["model"]), _weights(root)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # no warmup: a single step at warmup's starting learning rate (0) would train nothing (sft's adapter_effect check)
    sft = SFTConfig.model_validate({"method": {"name": "lora", "r": 4}, "max_length": 64, "training": {"max_steps": 1, "warmup_ratio": 0.0}})
    sft_ref = run_stage(SFTStage(), sft, {"data": assets["data"], "pretrain": ref}, store, cpu_profile())
    outputs = json.loads((Path(sft_ref.path) / "outputs.json").read_text())
    assert outputs["base_model"] == ref.path
    adapter = json.loads((Path(sft_ref.path) / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == ref.path
