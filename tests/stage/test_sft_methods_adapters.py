"""The seeds' methods beyond PEFT's built-ins train a few steps on CPU (trainable weights move,
frozen ones do not, each where its paper puts it), reload with `PeftModel.from_pretrained` to the
same logits, and serve on the embedded engine with the reloaded model's answers: P-Tuning v2,
LoRA+, GaLore, bottleneck adapters (sequential, parallel), AdapterDrop, MAM Adapter, UniPELT.
(AdapterFusion: test_sft_fusion.py.) Also: one engine serves LoRA and bottleneck adapters side
by side, in one batch, and refills a freed bottleneck slot."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.training import check_method, engine_tokens, method_assets, offline_tokens

torch.set_num_threads(1)
CASES = ["p_tuning_v2", "lora_plus", "galore", "adapter", "adapter-parallel", "adapter_drop", "mam_adapter", "unipelt"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return method_assets(tmp_path_factory.mktemp("sft-new-methods"))


@pytest.mark.parametrize("case", CASES)
def test_method_trains_reloads_and_serves(assets, tmp_path, case):
    check_method(assets, tmp_path, case)


def _adapter(model_path, config, dest, seed):
    """A saved adapter of `config` with random (non-identity) weights."""
    from peft import get_peft_model

    from tunepipe.tasks.lm.modeling import load_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(str(model_path)), config)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.5)
    model.save_pretrained(dest)
    return dest


def test_one_engine_serves_lora_and_bottleneck_adapters_in_one_batch(assets, tmp_path):
    from peft import LoraConfig, PeftModel

    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.serving.engine import MultiLoraEngine, Row
    from tunepipe.tasks.training import peft_methods
    from tunepipe.tasks.lm.modeling import load_model

    model = assets["model"]
    mam = peft_methods.peft_config(SFTConfig.model_validate({"method": {"name": "mam_adapter", "prefix_length": 3, "bottleneck_size": 8}}).method)
    paths = {
        "lora": _adapter(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "lora", 1),
        "mam": _adapter(model, mam, tmp_path / "mam", 2),
        "mam2": _adapter(model, mam, tmp_path / "mam2", 3),
    }
    prompt = [1, 20, 30, 40, 50, 60]
    eos = MultiLoraEngine(str(model)).eos_ids
    expected = {None: offline_tokens(load_model(str(model)).eval(), prompt, eos)}
    for name, path in paths.items():
        expected[name] = offline_tokens(PeftModel.from_pretrained(load_model(str(model)), str(path)).eval(), prompt, eos)
    assert len({tuple(v) for v in expected.values()}) == 4, "the adapters should answer differently for this check to mean anything"

    engine = MultiLoraEngine(str(model))
    engine.load_adapter("lora", paths["lora"])
    engine.load_adapter("mam", paths["mam"])
    assert set(engine.models) == {"LORA", "BOTTLENECK"}
    rows = [Row(prompt_ids=prompt, adapter=a, max_tokens=6, emit=lambda e: None) for a in (None, "lora", "mam", None, "mam")]
    engine.generate(rows)
    assert [r.tokens for r in rows] == [expected[None], expected["lora"], expected["mam"], expected[None], expected["mam"]]
    # A freed bottleneck slot is refilled by the next adapter of its shape (a weight copy).
    slot = engine.slots["mam"]
    engine.unload_adapter("mam")
    engine.load_adapter("mam2", paths["mam2"])
    assert engine.slots["mam2"] == slot
    assert engine_tokens(engine, prompt, "mam2") == expected["mam2"]
    assert engine_tokens(engine, prompt, "lora") == expected["lora"]
