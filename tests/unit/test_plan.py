"""The memory/parameter planner: meta-device counts equal PEFT's counts on real models, the
estimate reacts to the profile, and the sft, reward and align stages refuse a run that does not fit."""

from __future__ import annotations

import pytest
import torch

from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.training.memory_plan import check_fit, plan
from tunepipe.tasks.core.stage import StageFailed

torch.set_num_threads(1)


def assert_plan_counts_equal_peft(cfg, methods: dict, env, arch: str) -> None:
    """`plan`'s meta-device counts equal PEFT's on the real (randomly initialised) model, per method."""
    from transformers import AutoModelForCausalLM

    for label, spec in methods.items():
        method = SFTConfig.model_validate({"method": spec}).method
        result = plan(cfg, method, env, seq_len=32)
        torch.manual_seed(0)
        real = peft_methods.apply_method(AutoModelForCausalLM.from_config(cfg), method, total_step=10)
        expected = real.get_nb_trainable_parameters() if method.is_peft else peft_methods.count_parameters(real)
        assert (result["trainable_params"], result["total_params"]) == tuple(expected), f"{arch} {label}"
        assert result["trainable_params"] > 0 and 0 < result["trainable_percent"] <= 100, f"{arch} {label}"


def _configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    return {
        "llama": LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128),
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True),
    }


METHODS = {
    "full": "full",
    "freeze": {"name": "freeze", "train_last_layers": 1, "train_modules": ["lm_head"]},
    "lora-all-linear": {"name": "lora", "r": 4},
    "lora-dora": {"name": "lora", "r": 8, "use_dora": True, "modules_to_save": ["lm_head"]},
    "adalora": {"name": "adalora"},
    "ia3": "ia3",
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 7},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 5, "prefix_projection": True, "encoder_hidden_size": 16},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 6},
}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_meta_counts_equal_peft_counts_on_real_models(arch):

    cfg = _configs()[arch]
    env = load_environment("cpu")
    methods = dict(METHODS)
    if arch != "llama":
        methods["bitfit"] = "bitfit"  # GPT-2 and Qwen2 (q/k/v) have biases
    assert_plan_counts_equal_peft(cfg, methods, env, arch)


def test_qlora_counts_equal_a_real_4bit_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from tunepipe.tasks.training.trainer import load_base

    cfg = _configs()["llama"]
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    method = SFTConfig.model_validate({"method": {"name": "qlora", "r": 4}}).method
    env = load_environment("cpu")
    real = peft_methods.apply_method(load_base(str(tmp_path), method, env), method)
    assert any(type(p).__name__ == "Params4bit" for p in real.parameters())
    result = plan(str(tmp_path), method, env, seq_len=32)
    assert (result["trainable_params"], result["total_params"]) == real.get_nb_trainable_parameters()


def test_bitfit_on_a_bias_less_model_fails_at_plan_time():
    with pytest.raises(StageFailed, match="no bias parameters"):
        plan(_configs()["llama"], SFTConfig.model_validate({"method": "bitfit"}).method, load_environment("cpu"), 32)


def _seven_b():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000)


def test_memory_estimate_for_a_7b_model_per_profile():
    cfg = _seven_b()
    gpu24 = load_environment("single-gpu-24gb")
    lora = plan(cfg, SFTConfig.model_validate({"method": "lora"}).method, gpu24, 1024)
    qlora = plan(cfg, SFTConfig.model_validate({"method": "qlora"}).method, gpu24, 1024)
    full = plan(cfg, SFTConfig.model_validate({"method": "full"}).method, gpu24, 1024)
    assert 6.5e9 < full["total_params"] < 7e9 and full["trainable_params"] == full["total_params"]
    assert set(lora["memory"]) >= {"weights_gb", "gradients_gb", "optimizer_gb", "activations_gb", "total_gb", "fits"}
    assert 12 < lora["memory"]["weights_gb"] < 13.5  # bf16
    assert 3 < qlora["memory"]["weights_gb"] < 5  # 4-bit linears, embeddings and head in fp32
    assert qlora["memory"]["fits"] and not full["memory"]["fits"]
    # TRL's chunked loss computes its chunk in float32 at any head dtype: QLoRA's float32 head costs nothing more there;
    # a plain Trainer's full logits (nll) pay 4 + 8 bytes per logit against bf16's 2 + 8.
    assert qlora["memory"]["logits_gb"] == lora["memory"]["logits_gb"]
    from tunepipe.tasks.training.memory_plan import logits_bytes

    assert logits_bytes("nll", 1024, 32000, 2, float32_head=True) == logits_bytes("nll", 1024, 32000, 2, float32_head=False) * 12 / 10
    assert full["memory"]["optimizer_gb"] > 20
    # ZeRO-3 with offload over 8 GPUs: optimizer states leave the GPU, weights are sharded.
    zero3 = plan(cfg, SFTConfig.model_validate({"method": "full"}).method, load_environment("multi-gpu-deepspeed-zero3"), 1024)
    assert zero3["memory"]["optimizer_gb"] == 0 and zero3["memory"]["weights_gb"] == 0
    # Gradient checkpointing cuts activations.
    no_ckpt = plan(cfg, SFTConfig.model_validate({"method": "lora"}).method, gpu24.model_copy(update={"gradient_checkpointing": False}), 1024)
    assert no_ckpt["memory"]["activations_gb"] > 5 * lora["memory"]["activations_gb"]
    # Liger's fused cross-entropy never holds the logits: that term goes, nothing else changes.
    liger = plan(cfg, SFTConfig.model_validate({"method": "lora"}).method, gpu24.model_copy(update={"liger_kernel": True}), 1024)
    nll = plan(cfg, SFTConfig.model_validate({"method": "lora"}).method, gpu24, 1024, loss_type="nll")
    assert nll["memory"]["logits_gb"] > 0.5 and liger["memory"]["logits_gb"] == 0
    assert liger["memory"]["activations_gb"] < lora["memory"]["activations_gb"]


def test_check_fit_says_what_to_change():
    with pytest.raises(StageFailed) as info:
        check_fit(_seven_b(), SFTConfig.model_validate({"method": "full"}).method, load_environment("single-gpu-24gb"), 1024)
    message = str(info.value)
    assert "single-gpu-24gb has 24 GiB" in message
    assert "qlora" in message and "per_device_batch_size" in message and "ZeRO" in message


def test_sft_stage_refuses_before_loading_the_model(tmp_path):
    from tunepipe.schemas.manifest import ArtifactRef
    from tunepipe.tasks.core.artifacts import ArtifactStore
    from tunepipe.tasks.sft.stage import SFTStage
    from tunepipe.tasks.core.stage import run_stage

    cfg = _configs()["llama"]
    cfg.save_pretrained(tmp_path / "model")  # a config only: loading weights would fail
    tiny = load_environment("cpu").model_copy(update={"device_memory_gb": 1e-6})
    config = SFTConfig.model_validate({"model": str(tmp_path / "model"), "method": "lora"})
    data = ArtifactRef(stage="data", key="k", path=str(tmp_path))
    with pytest.raises(StageFailed, match="To fit"):
        run_stage(SFTStage(), config, {"data": data}, ArtifactStore(tmp_path / "artifacts"), tiny)


def _pairs_data(path):
    """A data artifact directory holding preference pairs only (what reward and DPO read)."""
    import json

    path.mkdir()
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "task": "t", "split": "train"} for i in range(4)]
    (path / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft_adapter_artifact(path, base):
    """An sft artifact as align and reward read it: a LoRA adapter handoff on `base` and its manifest (the sft
    stage's key payload of a LoRA config)."""
    import json

    from tunepipe.schemas.manifest import Manifest, Timings
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.sft.stage import SFTStage

    path.mkdir()
    (path / "adapter").mkdir()
    (path / "outputs.json").write_text(json.dumps({"kind": "adapter", "method": "lora", "base_model": str(base), "paths": {"all": "adapter"}}))
    manifest = Manifest(stage="sft", key="s", code_version="c", config=SFTStage().key_payload(SFTConfig.model_validate({"method": "lora"})),
                        timings=Timings(started_at="t0", finished_at="t1", seconds=0.0))
    (path / "manifest.json").write_text(manifest.model_dump_json())
    return path


@pytest.mark.parametrize("stage_name", ["reward", "align"])
def test_reward_and_align_refuse_before_loading_the_model(tmp_path, stage_name):
    """As sft does: a run the plan says will not fit fails first, naming what trains and what to change. The base
    is a config only, so any later step (the reward stage's SFT merge, a training process) would fail otherwise."""
    from tunepipe.schemas.align import AlignConfig
    from tunepipe.schemas.manifest import ArtifactRef
    from tunepipe.schemas.reward import RewardConfig
    from tunepipe.tasks.align.stage import AlignStage
    from tunepipe.tasks.core.artifacts import ArtifactStore
    from tunepipe.tasks.core.stage import run_stage
    from tunepipe.tasks.reward.stage import RewardStage

    _configs()["llama"].save_pretrained(tmp_path / "model")
    tiny = load_environment("cpu").model_copy(update={"device_memory_gb": 1e-6})
    data = ArtifactRef(stage="data", key="d", path=str(_pairs_data(tmp_path / "data")))
    sft = ArtifactRef(stage="sft", key="s", path=str(_sft_adapter_artifact(tmp_path / "sft", tmp_path / "model")))
    if stage_name == "reward":  # starts from the SFT adapter merged into its base: refused before the merge
        stage, config, planned = RewardStage(), RewardConfig.model_validate({"method": "lora", "start_from": "sft"}), "reward"
    else:
        stage, config, planned = AlignStage(), AlignConfig.model_validate({"method": "dpo"}), "dpo"
    with pytest.raises(StageFailed) as info:
        run_stage(stage, config, {"data": data, "sft": sft}, ArtifactStore(tmp_path / "artifacts"), tiny)
    message = str(info.value)
    assert f"lora on this model as {planned} (chosen + rejected rows per pair) needs" in message
    assert "profile cpu has 1e-06 GiB. To fit:" in message and "per_device_batch_size" in message


def test_reward_and_dpo_suggestions_are_planned_for_their_own_stage(monkeypatch):
    """A refusal's 'to fit' totals are the refused stage's own: every alternative suggestions() prices is planned as
    that stage (DPO's smaller batch still runs chosen + rejected rows), never as sft."""
    from tunepipe.tasks.training import memory_plan as mp

    planned = []
    real_plan = mp.plan

    def recording_plan(*args, **kwargs):
        planned.append(kwargs.get("stage", "sft"))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(mp, "plan", recording_plan)
    method = SFTConfig.model_validate({"method": "lora"}).method
    for stage in ("reward", "dpo"):
        planned.clear()
        lines = mp.suggestions(_configs()["llama"], method, load_environment("cpu"), 64, stage=stage)
        assert any("per_device_batch_size" in line for line in lines) and any("qlora" in line for line in lines)
        assert len(planned) >= 3 and set(planned) == {stage}


def test_the_planner_reads_the_optimizer_from_the_training_config():
    """The trainer and the planner read one TrainingConfig: an 8-bit optimizer is planned as two
    1-byte states per trainable parameter, not as Adam's."""

    full = SFTConfig.model_validate({"method": "full"})
    eight_bit = SFTConfig.model_validate({"method": "full", "training": {"optimizer": "adamw_8bit"}})
    env = load_environment("single-gpu-24gb")
    adam = plan(_seven_b(), full.method, env, 512, full.training)
    small = plan(_seven_b(), eight_bit.method, env, 512, eight_bit.training)
    assert small["memory"]["assumptions"]["optimizer"] == "adamw_8bit"
    assert small["memory"]["optimizer_gb"] == pytest.approx(small["trainable_params"] * 2 / 2**30, abs=1e-4)
    assert adam["memory"]["optimizer_gb"] > small["memory"]["optimizer_gb"] * 1.9


def _qwen_half_b():
    """Qwen2.5-0.5B's shape as a Llama: the GPU benchmark's model."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def test_plan_arithmetic_pinned_by_hand_on_the_benchmark_shape():
    """The planner's terms at hidden 896, SwiGLU 4864, 24 blocks, 14 heads, vocabulary 151,936, bf16, batch 16 x 1024.

    per block per token: (8.5*896 + 4*4864) * 2 B = 54,144 B; Liger (4*896 + 3*4864) * 2 B = 36,352 B;
    QLoRA adds 4*896 * 2 B = 7,168 B (float32 residual and norm outputs).
    """
    from tunepipe.tasks.training import memory_plan as mp

    gib = 2**30
    assert mp.activation_bytes_per_token(896, 4864, 24, 2, liger=False, qlora=False, checkpointing=False) == 24 * 54_144
    assert mp.activation_bytes_per_token(896, 4864, 24, 2, liger=True, qlora=False, checkpointing=False) == 24 * 36_352
    assert mp.activation_bytes_per_token(896, 4864, 24, 2, liger=False, qlora=True, checkpointing=False) == 24 * 61_312
    # Checkpointing: 24 block inputs (896 values) + one block recomputed.
    assert mp.activation_bytes_per_token(896, 4864, 24, 2, liger=False, qlora=False, checkpointing=True) == 24 * 896 * 2 + 54_144
    # sdpa: one bf16 bias per block; a packed batch is one flattened row of 16 * 1024 = 16,384 tokens.
    assert mp.attention_bytes("sdpa", 16, 1024, 14, 24, 2, padding_free=True) == 24 * 16384**2 * 2 == 12 * gib
    assert mp.attention_bytes("sdpa", 16, 1024, 14, 24, 2, padding_free=False) == 24 * 16 * 1024**2 * 2 == 0.75 * gib
    assert mp.attention_bytes("eager", 16, 1024, 14, 24, 2, padding_free=False) == 24 * 16 * 2.5 * 14 * 1024**2 * 2 == 26.25 * gib
    assert mp.attention_bytes("eager", 16, 1024, 14, 24, 2, padding_free=True) == 420 * gib  # quadratic in the flattened row
    for kernel in ("flash_attention_2", "flex_attention"):
        assert mp.attention_bytes(kernel, 16, 1024, 14, 24, 2, padding_free=True) == 0
    # Logits: a plain Trainer (nll) holds 16,384 x 151,936 x (2 + 4 + 4) B = 23.18 GiB; TRL's chunked_nll one 256-token
    # chunk in float32 whatever the model's dtype: logits, log-softmax, its exp, the entropy product, a gradient (5 x 4 B).
    assert mp.logits_bytes("nll", 16384, 151936, 2, float32_head=False) == 16384 * 151936 * 10
    assert round(mp.logits_bytes("nll", 16384, 151936, 2, float32_head=False) / gib, 2) == 23.18
    assert mp.logits_bytes("chunked_nll", 16384, 151936, 2, float32_head=False) == 256 * 151936 * 20
    assert mp.logits_bytes("chunked_nll", 16384, 151936, 2, float32_head=True) == 256 * 151936 * 20
    assert mp.logits_bytes("liger", 16384, 151936, 2, float32_head=False) == 0


def test_plan_of_packed_rows_depends_on_the_packed_kernel_and_the_loss():
    from tunepipe.tasks.training.memory_plan import count, memory_estimate

    lora = SFTConfig.model_validate({"method": {"name": "lora", "r": 16}}).method
    trainable, total, prepared = count(_qwen_half_b(), lora)  # one meta model for every variant

    def plan_memory(env, **kwargs):
        return memory_estimate(prepared, lora, env, 1024, trainable, total, **kwargs)

    env = load_environment("single-gpu-80gb").model_copy(
        update={"attn_implementation": "sdpa", "packed_attention": [], "per_device_batch_size": 16}
    )
    dense = plan_memory(env, packing=True)
    varlen = plan_memory(env.model_copy(update={"packed_attention": ["flash_attention_2", "flex_attention"]}), packing=True)
    unpacked = plan_memory(env.model_copy(update={"packed_attention": ["flash_attention_2"]}))
    assert dense["attention_gb"] == 12.0 and varlen["attention_gb"] == 0.0
    assert varlen["assumptions"]["attn_implementation"] == "flash_attention_2" and varlen["assumptions"]["padding_free"]
    assert unpacked["assumptions"]["attn_implementation"] == "sdpa" and unpacked["attention_gb"] == 0.75  # padded rows keep sdpa
    assert dense["activations_gb"] == varlen["activations_gb"] == round(16384 * 24 * 54_144 / 2**30, 4)
    # The total is the sum of the terms plus 10%.
    terms = sum(v for k, v in dense.items() if k.endswith("_gb") and k not in ("total_gb", "device_memory_gb", "overhead_gb"))
    assert dense["total_gb"] == pytest.approx(terms * 1.1, abs=1e-3)
    # A plain Trainer's full logits (nll) against TRL's chunked loss: the 2x gap measured unpacked on the H100.
    nll = plan_memory(env, loss_type="nll")
    assert nll["logits_gb"] - unpacked["logits_gb"] == pytest.approx(16384 * 151936 * 10 / 2**30 - 256 * 151936 * 20 / 2**30, abs=1e-3)


# The seeds' taxonomy beyond PEFT's built-ins: bottleneck adapters (a PEFT method registered by
# tunepipe), MAM/UniPELT (prefix + adapter (+ gated LoRA)), P-Tuning v2, LoRA+ and GaLore.
NEW_METHODS = {
    "p_tuning_v2": {"name": "p_tuning_v2", "num_virtual_tokens": 5},
    "lora_plus": {"name": "lora_plus", "r": 4},
    "galore": {"name": "galore", "rank": 8},
    "adapter": {"name": "adapter", "bottleneck_size": 8},
    "adapter-parallel": {"name": "adapter", "bottleneck_size": 8, "placement": "parallel"},
    "adapter_drop": {"name": "adapter_drop", "bottleneck_size": 8, "drop_first_layers": 1},
    "mam_adapter": {"name": "mam_adapter", "prefix_length": 3, "bottleneck_size": 16},
    "unipelt": {"name": "unipelt", "lora_r": 4, "prefix_length": 3, "bottleneck_size": 8},
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_meta_counts_of_the_newer_methods_equal_peft_counts(arch):

    cfg = _configs()[arch]
    env = load_environment("cpu")
    assert_plan_counts_equal_peft(cfg, NEW_METHODS, env, arch)
