"""sft/pretrain method configs: invalid combinations fail at validation naming the field, and
each config converts to the library object it names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from tunepipe.schemas.pretrain import PretrainConfig
from tunepipe.schemas.methods import FreezeMethod, LoraMethod, QLoraMethod
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.training import peft_methods
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.core.environment import load_environment


def _error(data: dict, model=SFTConfig) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return str(info.value)


def test_method_shorthand_and_default():
    assert SFTConfig.model_validate({"method": "ia3"}).method.name == "ia3"
    assert isinstance(SFTConfig().method, LoraMethod)
    assert PretrainConfig.model_validate({"method": "full"}).method.name == "full"


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"method": {"name": "ia3", "r": 8}}, "method.ia3.r"),  # a knob of another method
        ({"method": {"name": "qlora", "init": "pissa"}}, "method.qlora.init"),  # PiSSA rewrites 4-bit base weights
        ({"method": {"name": "lora", "init": "pissa", "use_dora": True}}, "method.lora"),
        ({"method": {"name": "qlora", "quant_type": "int3"}}, "method.qlora.quant_type"),
        ({"method": {"name": "adalora", "init_r": 4, "target_r": 8}}, "target_r"),
        ({"method": {"name": "prompt_tuning", "init": "text"}}, "init_text"),
        ({"method": {"name": "prefix_tuning", "encoder_hidden_size": 8}}, "prefix_projection"),
        ({"method": {"name": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}}, "feedforward_modules"),
        ({"method": {"name": "freeze", "train_last_layers": 0}}, "nothing would train"),
        ({"method": {"name": "lora", "target_modules": []}}, "method.lora.target_modules"),
        ({"method": {"name": "dora"}}, "method"),  # unknown method
        ({"method": "full", "adapters": "per_task"}, "adapters: per_task"),
        ({"method": "prompt_tuning", "packing": True}, "packing"),
        ({"chat_template": "llama-99"}, "chat_template"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate"),
        ({"max_length": 4}, "max_length"),
        ({"overlong": "ignore"}, "overlong"),
        ({"tasks": []}, "tasks is empty"),
        ({"epochs": 3}, "epochs"),  # belongs under training:
        ({"method": {"name": "adapter", "placement": "diagonal"}}, "method.adapter.placement"),
        ({"method": {"name": "adapter", "target_modules": []}}, "method.adapter.target_modules"),
        ({"method": {"name": "adapter_drop", "drop_first_layers": 0}}, "method.adapter_drop.drop_first_layers"),
        ({"method": {"name": "unipelt", "key_module": "q_proj"}}, "one layer holds one role"),
        ({"method": "mam_adapter", "packing": True}, "packing"),
        ({"method": {"name": "adapter_fusion", "adapters_from": "x", "fuse": ["a"]}}, "at least two"),
        ({"method": {"name": "adapter_fusion", "adapters_from": "x"}, "adapters": "per_task"}, "adapters: shared"),
        ({"method": {"name": "lora_plus", "lr_ratio": 0}}, "method.lora_plus.lr_ratio"),
        ({"method": {"name": "galore", "optimizer": "adamw_torch"}}, "method.galore.optimizer"),
    ],
)
def test_invalid_sft_configs_name_the_field(data, expected):
    assert expected in _error(data)


def test_invalid_pretrain_configs_name_the_field():
    assert "method" in _error({"method": "qlora"}, PretrainConfig)
    assert "packing" in _error({"packing": "none"}, PretrainConfig)
    assert "validation_fraction" in _error({"validation_fraction": 0.9}, PretrainConfig)


def test_lora_config_conversion():
    method = LoraMethod(name="lora", r=16, alpha=32, dropout=0.1, target_modules="all-linear", use_rslora=True, init="pissa")
    config = peft_methods.lora_config(method)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.1)
    assert config.use_rslora and not config.use_dora and config.init_lora_weights == "pissa"
    assert config.target_modules == "all-linear" and config.task_type == "CAUSAL_LM"
    assert peft_methods.lora_config(method, for_counting=True).init_lora_weights is True


def test_qlora_settings_come_from_the_profile_unless_set():
    gpu = load_environment("single-gpu-24gb")
    bnb = peft_methods.bnb_config(QLoraMethod(name="qlora"), gpu)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert str(bnb.bnb_4bit_compute_dtype) == "torch.bfloat16"
    bnb = peft_methods.bnb_config(QLoraMethod(name="qlora", quant_type="fp4", double_quant=False, compute_dtype="float32"), gpu)
    assert bnb.bnb_4bit_quant_type == "fp4" and not bnb.bnb_4bit_use_double_quant
    assert str(bnb.bnb_4bit_compute_dtype) == "torch.float32"
    assert peft_methods.optimizer_name(QLoraMethod(name="qlora"), SFTConfig().training) == "paged_adamw_8bit"


def test_other_peft_configs():
    sft = SFTConfig.model_validate
    ada = peft_methods.peft_config(sft({"method": {"name": "adalora", "tinit": 2, "tfinal": 2}}).method, total_step=50)
    assert type(ada).__name__ == "AdaLoraConfig" and ada.total_step == 50 and ada.target_r == 8
    assert type(peft_methods.peft_config(sft({"method": "ia3"}).method)).__name__ == "IA3Config"
    pt = peft_methods.peft_config(sft({"method": {"name": "prompt_tuning", "num_virtual_tokens": 5}}).method)
    assert type(pt).__name__ == "PromptTuningConfig" and pt.num_virtual_tokens == 5
    prefix = peft_methods.peft_config(sft({"method": {"name": "prefix_tuning", "prefix_projection": True, "encoder_hidden_size": 32}}).method)
    assert prefix.prefix_projection and prefix.encoder_hidden_size == 32
    ptune = peft_methods.peft_config(sft({"method": {"name": "p_tuning", "encoder_type": "LSTM"}}).method)
    assert type(ptune).__name__ == "PromptEncoderConfig" and str(ptune.encoder_reparameterization_type).endswith("LSTM")
    assert peft_methods.peft_config(sft({"method": "full"}).method) is None


def test_trainer_args_come_from_the_profile(tmp_path):
    training = SFTConfig().training
    cpu = load_environment("cpu")
    args = peft_methods.trainer_args(training, cpu, output_dir=tmp_path, max_length=64, packing=False, optim="adamw_torch", has_eval=False)
    assert args.use_cpu and not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    assert args.per_device_train_batch_size == cpu.per_device_batch_size and args.output_dir == str(tmp_path)
    gpu = load_environment("single-gpu-24gb").model_copy(update={"device": "cpu"})  # no GPU here: device only
    flags = hardware(load_environment("single-gpu-24gb")).precision_flags()
    assert flags == {"bf16": True, "fp16": False, "use_cpu": False}
    assert gpu.gradient_checkpointing and gpu.gradient_accumulation_steps == 4
    assert not args.use_liger_kernel
    liger = peft_methods.training_arguments(training, gpu.model_copy(update={"liger_kernel": True}), output_dir=tmp_path, optim="adamw_torch")
    assert liger["use_liger_kernel"] is True


def test_freeze_and_bitfit_select_parameters():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    with init_empty_weights():
        llama = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=100))
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100))
    assert peft_methods.decoder_layers(llama) == ("model.layers", 3)
    assert peft_methods.decoder_layers(gpt2) == ("transformer.h", 2)
    names = peft_methods.trainable_names(llama, FreezeMethod(name="freeze", train_last_layers=2, train_modules=[r"^model\.norm"]))
    assert names and all(".layers.1." in n or ".layers.2." in n or n == "model.norm.weight" for n in names)
    assert "model.norm.weight" in names
    with pytest.raises(ValueError, match="no bias parameters"):
        peft_methods.mark_trainable(llama, SFTConfig.model_validate({"method": "bitfit"}).method)
    assert peft_methods.mark_trainable(gpt2, SFTConfig.model_validate({"method": "bitfit"}).method) > 0


YAML = """
sft:
  method:
    name: qlora
    r: 16
    alpha: 32
    target_modules: all-linear
    use_dora: {dora}
  adapters: per_task
  chat_template: model
  max_length: 1024
  packing: true
  training: {{epochs: 2, learning_rate: 1.0e-4, save_steps: 100}}
"""


def test_yaml_section_validates_and_errors_name_path_and_line():
    import yaml

    from tunepipe.tasks.core.loading import ConfigError, validate_yaml_mapping

    text = YAML.format(dora="true")
    config = validate_yaml_mapping(SFTConfig, yaml.safe_load(text)["sft"], text=text, source="pipeline.yaml")
    assert config.method.name == "qlora" and config.method.use_dora and config.adapters == "per_task"
    bad = YAML.format(dora="maybe")
    with pytest.raises(ConfigError, match=r"method\.qlora\.use_dora"):
        validate_yaml_mapping(SFTConfig, yaml.safe_load(bad)["sft"], text=bad, source="pipeline.yaml")


def test_a_4bit_base_is_quantized_onto_this_process_gpu(monkeypatch):
    # The Trainer never moves a bitsandbytes model: on CUDA the 4-bit base must load on the GPU.
    assert hardware(load_environment("cpu")).quantized_device_map() is None
    assert hardware(load_environment("single-gpu-24gb")).quantized_device_map() == {"": 0}
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert hardware(load_environment("multi-gpu-deepspeed")).quantized_device_map() == {"": 3}

    # load_base hands it to from_pretrained for a 4-bit base only (the Trainer moves the others).
    import tunepipe.tasks.lm.modeling as modeling
    from tunepipe.tasks.training.trainer import load_base

    calls = []
    monkeypatch.setattr(modeling, "load_model", lambda path, **kw: calls.append(kw) or SimpleNamespace(config=SimpleNamespace()))
    gpu = load_environment("single-gpu-24gb")
    load_base("m", SFTConfig.model_validate({"method": "qlora"}).method, gpu)
    load_base("m", SFTConfig.model_validate({"method": "lora"}).method, gpu)
    assert calls[0]["device_map"] == {"": 3} and calls[0]["quantization"] is not None
    assert calls[1]["device_map"] is None and calls[1]["quantization"] is None


def test_liger_changes_the_training_key():
    from tunepipe.tasks.training.stage_base import training_env_payload

    gpu = load_environment("single-gpu-24gb")
    assert training_env_payload(gpu.model_copy(update={"liger_kernel": True})) != training_env_payload(gpu)


def test_newer_methods_convert_to_their_library_objects():
    from tunepipe.schemas.training import TrainingConfig

    v2 = peft_methods.peft_config(SFTConfig.model_validate({"method": {"name": "p_tuning_v2", "num_virtual_tokens": 7}}).method)
    assert type(v2).__name__ == "PrefixTuningConfig" and v2.num_virtual_tokens == 7 and not v2.prefix_projection
    plus = peft_methods.peft_config(SFTConfig.model_validate({"method": {"name": "lora_plus", "r": 4}}).method)
    assert type(plus).__name__ == "LoraConfig" and plus.r == 4  # LoRA+ is a LoRA: only the optimizer differs
    mam = peft_methods.peft_config(SFTConfig.model_validate({"method": "mam_adapter"}).method)
    assert (mam.peft_type, mam.placement, mam.scaling, mam.target_modules, mam.prefix_modules, mam.prefix_length) == (
        "BOTTLENECK", "parallel", 4.0, ["mlp"], ["k_proj"], 30)
    uni = peft_methods.peft_config(SFTConfig.model_validate({"method": "unipelt"}).method)
    assert uni.gated and uni.lora_r == 8 and uni.lora_modules == ["q_proj", "v_proj"] and uni.placement == "sequential"
    galore = SFTConfig.model_validate({"method": {"name": "galore", "rank": 16, "layerwise": True}}).method
    assert not galore.is_peft and peft_methods.peft_config(galore) is None
    assert peft_methods.optimizer_name(galore, TrainingConfig()) == "galore_adamw_layerwise"
    extra = peft_methods.optimizer_arguments(galore)
    assert extra["optim_target_modules"] == [r".*attn.*", r".*mlp.*"] and "rank=16" in extra["optim_args"]


def test_adapter_fusion_refuses_an_artifact_without_per_task_adapters(tmp_path):
    method = SFTConfig.model_validate({"method": {"name": "adapter_fusion", "adapters_from": str(tmp_path)}}).method
    with pytest.raises(ValueError, match="need at least two"):
        peft_methods.peft_config(method)


def test_align_adapter_is_built_by_the_same_lora_builder_with_lora_settings():
    # One LoraConfig builder for sft and align: align's adapter on a full-model SFT result takes LoRA's settings too.
    from tunepipe.schemas.align import AlignConfig

    lora = AlignConfig.model_validate(
        {"lora": {"r": 4, "alpha": 8, "use_rslora": True, "use_dora": True, "bias": "lora_only", "modules_to_save": ["lm_head"],
                  "target_modules": ["q_proj", "v_proj"]}}
    ).lora
    config = peft_methods.lora_config(lora)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)  # align's dropout default stays 0
    assert config.use_rslora and config.use_dora and config.bias == "lora_only" and config.modules_to_save == ["lm_head"]
    assert sorted(config.target_modules) == ["q_proj", "v_proj"] and config.init_lora_weights is True
    with pytest.raises(ValueError, match="target_modules is empty"):
        AlignConfig.model_validate({"lora": {"target_modules": []}})
