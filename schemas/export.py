"""The `export:` section: serving-ready artifacts from the trained model.

Targets (`targets`): the PEFT adapters as they are (checked against the serving engine: vLLM
serves plain LoRA only), a merged full model (`merge_and_unload`, safetensors, tokenizer, chat
template, generation config), bitsandbytes 4-/8-bit checkpoints (vLLM loads pre-quantized bnb),
and GPTQ/AWQ through llm-compressor (GPU profiles only). Every quantized export is evaluated
again on the data's test split, so the quality it costs is a number in the metrics and the card.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tunepipe.schemas.base import CheckAction, StrictModel, self_checks_field

EXPORT_TARGETS = ("adapters", "merged", "bnb4", "bnb8", "gptq", "awq")
QUANTIZED_TARGETS = ("bnb4", "bnb8", "gptq", "awq")
Target = Literal["adapters", "merged", "bnb4", "bnb8", "gptq", "awq"]


EXPORT_CHECKS = ("merged_matches_adapter",)  # the self-checks the stage runs (tasks/training/checks.py)

class Bnb4Settings(StrictModel):
    """bitsandbytes 4-bit export. Unset fields come from the profile's `quantization` defaults."""

    quant_type: Literal["nf4", "fp4"] | None = Field(default=None, description="4-bit data type; default: the profile's.")
    double_quant: bool | None = Field(default=None, description="Quantize the quantization constants; default: the profile's.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None, description="dtype weights are dequantized to for matmuls; default: the profile's."
    )


class Bnb8Settings(StrictModel):
    """bitsandbytes LLM.int8() export."""

    threshold: float = Field(default=6.0, gt=0, description="Outlier threshold: activations above it stay in 16 bits (llm_int8_threshold).")


class CompressorSettings(StrictModel):
    """GPTQ or AWQ weight quantization through llm-compressor (needs a CUDA profile and `llmcompressor`)."""

    bits: Literal[4, 8] = Field(default=4, description="Weight bits (AWQ: 4 only).")
    group_size: Literal[32, 64, 128] = Field(default=128, description="Weights sharing one scale.")
    calibration_examples: int = Field(default=128, ge=1, description="Training examples (rendered prompts + answers) used to calibrate.")
    max_seq_length: int = Field(default=512, ge=8, description="Longest calibration sequence, in tokens.")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="Modules left unquantized.")


class ReevalConfig(StrictModel):
    """Task metrics (exact match, token F1) on the test split for the reference and every quantized export."""

    max_examples_per_task: int = Field(default=64, ge=1, description="Test records per task answered by every evaluated export.")
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together.")


class ExportConfig(StrictModel):
    """Serving artifacts from the `sft` or `align` artifact: adapters, merged model, quantized models, model card."""

    source: Literal["auto", "sft", "align"] = Field(
        default="auto", description="Which trained artifact to export: `auto` takes `align` when the pipeline has it, else `sft`."
    )
    targets: list[Target] | None = Field(
        default=None,
        description="What to export: `adapters`, `merged`, `bnb4`, `bnb8`, `gptq`, `awq`. Default: adapters and merged for "
        "an adapter source, merged for full weights.",
    )
    serving_engine: Literal["vllm", "embedded"] | None = Field(
        default=None,
        description="Engine the adapters must be servable by; `vllm` refuses DoRA, IA3, AdaLoRA, prompt learning, "
        "modules_to_save and ranks above max_lora_rank. Default: the profile's `serving.engine`.",
    )
    max_lora_rank: int | None = Field(
        default=None, ge=1, description="Largest adapter rank the server accepts (--max-lora-rank); default: the profile's."
    )
    bnb4: Bnb4Settings = Field(default_factory=Bnb4Settings, description="Settings of the `bnb4` target.")
    bnb8: Bnb8Settings = Field(default_factory=Bnb8Settings, description="Settings of the `bnb8` target.")
    gptq: CompressorSettings = Field(default_factory=CompressorSettings, description="Settings of the `gptq` target.")
    awq: CompressorSettings = Field(default_factory=CompressorSettings, description="Settings of the `awq` target.")
    reeval: ReevalConfig = Field(default_factory=ReevalConfig, description="Re-evaluation of the exports on the test split.")
    self_checks: dict[Literal[EXPORT_CHECKS], CheckAction] = self_checks_field("export", EXPORT_CHECKS)

    @model_validator(mode="after")
    def _targets(self) -> "ExportConfig":
        if self.targets is not None:
            if not self.targets:
                raise ValueError("targets is empty: omit it for the default (adapters and merged)")
            duplicated = sorted({t for t in self.targets if self.targets.count(t) > 1})
            if duplicated:
                raise ValueError(f"targets lists {duplicated} more than once")
        if self.awq.bits != 4:
            raise ValueError("awq.bits: AWQ quantizes weights to 4 bits only")
        return self
