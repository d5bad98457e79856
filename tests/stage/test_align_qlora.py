"""DPO on a QLoRA SFT adapter: the align stage trains on the 4-bit (bitsandbytes, CPU) base, and the
saved adapter loads with `PeftModel.from_pretrained` on that 4-bit base, its weights moved from SFT's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.core.stage import run_stage
from tests.helpers.alignment import ANSWERS, data_with_pairs, env
from tests.helpers.training import WORDS, build_tiny_model, write_data_artifact

torch.set_num_threads(1)
pytest.importorskip("bitsandbytes")


def test_dpo_on_a_qlora_sft_adapter(tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunepipe.tasks.align import policy as policy_module
    from tunepipe.schemas.handoffs import SFTKeyedConfig
    from tunepipe.tasks.core.handoff import read_manifest_config
    from tunepipe.tasks.training.trainer import load_base

    model = build_tiny_model(tmp_path / "model")
    data = write_data_artifact(tmp_path / "data")
    store = ArtifactStore(tmp_path / "artifacts")
    sft_config = SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "qlora", "r": 4, "quant_type": "nf4"}, "max_length": 64,
         "training": {"max_steps": 2, "warmup_ratio": 0.0}, "heldout": {"max_examples_per_task": 0}}
    )
    sft = run_stage(SFTStage(), sft_config, {"data": data}, store, env())
    pairs = [
        {"id": f"p{i}", "task": "count", "prompt": f"Describe the {w}.", "chosen": ANSWERS[0], "rejected": ANSWERS[1],
         "split": "test" if i % 4 == 3 else "train"}
        for i, w in enumerate(WORDS[:12])
    ]
    pairs_data = data_with_pairs({"root": tmp_path, "data": data}, "data-pairs", pairs)
    config = AlignConfig.model_validate(
        {"method": {"name": "dpo", "beta": 0.1}, "max_length": 64,
         "heldout": {"max_pairs": 3, "max_examples_per_task": 1, "max_new_tokens": 4},
         "training": {"max_steps": 2, "learning_rate": 1e-2, "warmup_ratio": 0.0}}
    )
    # Record what the align job trains (the cpu profile runs it in this process): the real policy, unchanged.
    trained = {}
    real_load_policy = policy_module.load_policy

    def recording_load_policy(*args, **kwargs):
        policy, tokenizer = real_load_policy(*args, **kwargs)
        trained["linear4bit"] = sum(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())
        trained["trainable"] = sorted(n for n, p in policy.named_parameters() if p.requires_grad)
        return policy, tokenizer

    monkeypatch.setattr(policy_module, "load_policy", recording_load_policy)
    ref = run_stage(AlignStage(), config, {"data": pairs_data, "sft": sft}, store, env())

    out = Path(ref.path)
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["sft_method"] == "qlora" and outputs["kind"] == "adapter"
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    assert metrics["global_step"] == {"all": 2}
    assert metrics["heldout"]["all"]["preferences"]["n"] == 3
    assert trained["linear4bit"] > 0, "the align job did not train on a 4-bit base"
    assert trained["trainable"] and all("lora_" in n for n in trained["trainable"]), trained["trainable"]

    # The adapter was trained further: every LoRA tensor moved from the SFT adapter's.
    sft_weights = load_file(str(Path(sft.path) / "adapter" / "adapter_model.safetensors"))
    aligned_weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert sorted(aligned_weights) == sorted(sft_weights)
    unchanged = [k for k in sft_weights if torch.equal(sft_weights[k], aligned_weights[k])]
    assert unchanged == [], f"not trained by DPO: {unchanged}"

    # It loads on the 4-bit base (the SFT run's own quantization) and answers differently from SFT.
    method = read_manifest_config(sft, SFTKeyedConfig, reader="test").method
    base = load_base(outputs["base_model"], method, env())
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()), "the base did not load in 4 bits"
    policy = PeftModel.from_pretrained(base, str(out / "adapter"), adapter_name="aligned").eval()
    policy.load_adapter(str(Path(sft.path) / "adapter"), adapter_name="sft")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        policy.set_adapter("aligned")
        aligned_logits = policy(input_ids=ids).logits
        policy.set_adapter("sft")
        sft_logits = policy(input_ids=ids).logits
    assert torch.isfinite(aligned_logits).all()
    assert not torch.allclose(aligned_logits, sft_logits)
