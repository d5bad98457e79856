"""Mixture-of-Experts fine-tuning on tiny randomly initialised Mixtral and Qwen2-MoE models: LoRA
SFT (attention only; attention + the fused experts through PEFT's target_parameters) with the
router's load-balancing loss on and logged per step, DPO on the result, export (with the verdict
whether vLLM can serve the adapter) and the embedded server answering with the adapter; the
planner's total vs active parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from tunepipe.schemas.align import AlignConfig
from tunepipe.schemas.export import ExportConfig
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.align.stage import AlignStage
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.core.stage import StageFailed, run_stage
from tunepipe.tasks.export.stage import ExportStage
from tunepipe.tasks.sft.stage import SFTStage

from tests.helpers.alignment import ANSWERS, data_with_pairs
from tests.helpers.training import (
    WORDS,
    build_tiny_moe,
    cpu_profile,
    write_data_artifact,
)

torch.set_num_threads(1)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Mixtral: LoRA on attention only. Qwen2-MoE: attention and the fused expert tensors.
LORA = {"mixtral": {"target_modules": ATTENTION}, "qwen2_moe": {"target_modules": ATTENTION, "target_parameters": EXPERTS}}


def _manifest(ref) -> dict:
    return json.loads((Path(ref.path) / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = build_tiny_moe(root / kind, kind)
    data = write_data_artifact(root / "data")
    store = ArtifactStore(root / "artifacts")
    config = SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "lora", "r": 4, "dropout": 0.0, **LORA[kind]}, "max_length": 64,
         "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "router": {"router_aux_loss_coef": 0.05}}}
    )
    sft = run_stage(SFTStage(), config, {"data": data}, store, cpu_profile())
    return {"kind": kind, "root": root, "model": model, "data": data, "store": store, "sft": sft}


def test_sft_trains_lora_with_the_router_loss_logged(moe):
    m = _manifest(moe["sft"])
    adapter = json.loads((Path(moe["sft"].path) / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(ATTENTION)
    assert (adapter.get("target_parameters") or []) == LORA[moe["kind"]].get("target_parameters", [])
    aux = m["step_metrics"]["all"]["router_aux_loss"]
    assert [p["step"] for p in aux] == list(range(1, 9))
    # Switch-style balance loss: E * sum(f_i * P_i) per layer, summed over 2 layers; 2.0 per
    # layer... exactly k=2 when perfectly balanced, so about 4 here and never 0.
    assert all(1.0 < p["value"] < 16.0 for p in aux), aux
    assert (Path(moe["sft"].path) / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((Path(moe["sft"].path) / "metrics.json").read_text())["all"]
    assert run["router_aux_loss_coef"] == 0.05  # ours, not TRL's default 0.001
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(moe["model"]))
    model = PeftModel.from_pretrained(base, str(Path(moe["sft"].path) / "adapter"))
    trained = {n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    assert any("self_attn" in n for n in trained)
    assert any(".experts." in n for n in trained) == ("target_parameters" in LORA[moe["kind"]])


def test_router_loss_off_is_not_logged(moe):
    config = SFTConfig.model_validate(
        {"model": str(moe["model"]), "method": {"name": "lora", "r": 4, "target_modules": ATTENTION}, "max_length": 64,
         "heldout": {"max_examples_per_task": 0},
         "training": {"max_steps": 2, "warmup_ratio": 0.0, "router": {"output_router_logits": False}}}
    )
    ref = run_stage(SFTStage(), config, {"data": moe["data"]}, moe["store"], cpu_profile())
    assert _manifest(ref)["step_metrics"]["all"] == {}
    assert json.loads((Path(ref.path) / "metrics.json").read_text())["all"]["router_aux_loss_coef"] == 0.0


def test_dpo_on_the_moe_policy(moe):
    pairs = [
        {"id": f"p{i}", "task": "count", "prompt": f"Describe the {w}.", "chosen": ANSWERS[0], "rejected": ANSWERS[1],
         "split": "test" if i % 4 == 3 else "train"}
        for i, w in enumerate(WORDS[:16])
    ]
    data = data_with_pairs({"root": moe["root"], "data": moe["data"]}, "data-pairs", pairs)
    config = AlignConfig.model_validate(
        {"method": {"name": "dpo", "beta": 0.5}, "max_length": 64,
         "heldout": {"max_examples_per_task": 0, "max_pairs": 8, "batch_size": 8},
         "training": {"max_steps": 6, "learning_rate": 3e-2, "warmup_ratio": 0.0}}
    )
    ref = run_stage(AlignStage(), config, {"data": data, "sft": moe["sft"]}, moe["store"], cpu_profile())
    m = _manifest(ref)
    assert len(m["step_metrics"]["all"]["router_aux_loss"]) == 6
    prefs = m["heldout"]["all"]["preferences"]
    assert prefs["aligned_accuracy"] == 1.0 and prefs["implicit_reward_margin"] > 0, prefs
    run = json.loads((Path(ref.path) / "metrics.json").read_text())["runs"]["all"]
    assert run["step_metrics"]["router_aux_loss"][0]["value"] > 1.0


def test_export_says_whether_vllm_serves_it_and_the_embedded_server_answers(moe, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.process import ServerThread
    from tunepipe.tasks.serving.settings import resolve_serve_config

    inputs = {"sft": moe["sft"], "data": moe["data"]}
    ref = run_stage(ExportStage(), ExportConfig.model_validate({"targets": ["adapters", "merged"], "reeval": {"max_examples_per_task": 2}}),
                    inputs, moe["store"], cpu_profile())
    verdict = _manifest(ref)["vllm_lora"]["all"]
    assert verdict["moe"] is True
    if moe["kind"] == "mixtral":
        assert verdict == {**verdict, "servable": True, "architecture": "MixtralForCausalLM", "problems": []}
    else:
        assert not verdict["servable"] and "target_parameters" in verdict["problems"][0]
        with pytest.raises(StageFailed, match="fused expert parameters"):
            run_stage(ExportStage(), ExportConfig.model_validate({"targets": ["adapters"], "serving_engine": "vllm"}),
                      inputs, moe["store"], cpu_profile())

    adapter = str(Path(ref.path) / "adapters" / "all")
    tokenizer = AutoTokenizer.from_pretrained(str(moe["model"]))
    messages = [{"role": "user", "content": "Count to three."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    offline = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(moe["model"])), adapter).eval()
    with torch.no_grad():
        expected = tokenizer.decode(offline.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:], skip_special_tokens=True)
    monkeypatch.setenv("MOE_TEST_SERVE_KEY", "k")  # keys are given by environment variable, never literally
    config = ServeConfig(base=str(moe["model"]), served_model_name="moe", lora_modules={"tuned": adapter}, engine="embedded",
                         api_key="${MOE_TEST_SERVE_KEY}", allowed_adapter_dirs=[str(Path(ref.path))], max_lora_rank=8, max_tokens_limit=16)
    with ServerThread(build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tuned", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content == expected


def test_plan_reports_total_and_active_parameters(moe, capsys):
    from transformers import AutoConfig
    from tunepipe.flows.cli.main import main

    cfg = AutoConfig.from_pretrained(str(moe["model"]))
    assert main(["plan", "--model", str(moe["model"]), "--method", "lora", "--target-modules", *ATTENTION, "--seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expert_width = cfg.moe_intermediate_size if moe["kind"] == "qwen2_moe" else cfg.intermediate_size
    per_expert = 3 * cfg.hidden_size * expert_width  # gate, up, down
    idle = cfg.num_hidden_layers * per_expert * (4 - 2)  # 4 experts, 2 run per token
    assert result["experts"] == {"per_block": 4, "active_per_token": 2}
    assert result["active_params"] == result["total_params"] - idle
    assert result["memory"]["weights_gb"] > 0
    assert main(["plan", "--model", str(moe["model"]), "--method", "lora", "--target-modules", *ATTENTION, "--seq-len", "64"]) == 0
    assert f"{result['active_params']:,} of {result['total_params']:,} parameters active" in capsys.readouterr().out
    # LoRA on the fused experts too: more trainable parameters, the same base (total counts adapters).
    assert main(["plan", "--model", str(moe["model"]), "--target-modules", *ATTENTION, "--target-parameters", *EXPERTS, "--json"]) == 0
    experts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert experts["trainable_params"] > result["trainable_params"]
    assert experts["total_params"] - experts["trainable_params"] == result["total_params"] - result["trainable_params"]
    with pytest.raises(ValueError, match="needs dropout: 0"):
        SFTConfig.model_validate({"method": {"name": "lora", "target_parameters": EXPERTS}})
