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
from tunepipe.schemas.scoring import ScoringConfig

EXPORT_TARGETS = ("adapters", "merged", "bnb4", "bnb8", "gptq", "awq", "gguf")
QUANTIZED_TARGETS = ("bnb4", "bnb8", "gptq", "awq")
Target = Literal["adapters", "merged", "bnb4", "bnb8", "gptq", "awq", "gguf"]
# GGUF types: the converter's (f32, f16, bf16, q8_0) and llama-quantize's k-quants and i-quants.
GGUFType = Literal[
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q3_k_s", "q3_k_l",
    "q2_k", "iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs",
]


EXPORT_CHECKS = ("merged_matches_adapter",)  # the self-checks the stage runs (tasks/lm/checks.py)

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


class ImatrixSettings(StrictModel):
    """Importance matrix for k-quants and i-quants, computed with llama.cpp's imatrix tool from the run's own
    training and validation conversations (rendered with the chat template), never a downloaded one."""

    enabled: bool = Field(default=True, description="Compute one when a listed type is a k-quant or i-quant (i-quants below 4 bits need it).")
    context: int = Field(default=256, ge=16, description="Tokens per chunk (llama-imatrix -c); the text must hold at least two chunks.")
    chunks: int = Field(default=64, ge=1, description="Most chunks processed (llama-imatrix --chunks).")
    max_records: int = Field(default=512, ge=1, description="Most training + validation records rendered into the imatrix text.")


class GGUFLimits(StrictModel):
    """Largest loss a quantised GGUF type may show against the merged model (unset: not checked)."""

    min_top1_agreement: float | None = Field(default=None, ge=0, le=1, description="Least share of validation positions whose most likely next token equals the merged model's.")
    max_mean_kl: float | None = Field(default=None, ge=0, description="Largest mean KL(merged ‖ GGUF) of the next-token distributions, in nats.")
    max_perplexity_ratio: float | None = Field(default=None, ge=1, description="Largest validation perplexity of the GGUF over the merged model's.")


def _default_gguf_limits() -> dict[str, GGUFLimits]:
    # q8_0 is near-lossless (the bar: top-1 agreement >= 0.95); lower types are reported unless limited here.
    return {"q8_0": GGUFLimits(min_top1_agreement=0.95), "q6_k": GGUFLimits(min_top1_agreement=0.9)}


class GGUFSettings(StrictModel):
    """GGUF files for llama.cpp, Ollama and LM Studio, made from the merged model with llama.cpp's own converter and
    quantizer (`tunepipe llamacpp-env` builds them once, pinned), each checked against the merged model."""

    types: list[GGUFType] = Field(
        default_factory=lambda: ["f16", "q8_0", "q4_k_m"],
        description="One file per type. f16 is always converted and checked (every other type is quantized from it); it is "
        "published when listed.",
    )
    imatrix: ImatrixSettings = Field(default_factory=ImatrixSettings, description="Importance matrix from the run's data for k-/i-quants.")
    limits: dict[GGUFType, GGUFLimits] = Field(
        default_factory=_default_gguf_limits,
        description="Per type, the loss it may show against the merged model; a type over its limit is reported as failed.",
    )
    f16_tie_margin: float = Field(
        default=0.05, ge=0,
        description="The f16 check allows a greedy answer to leave the merged model's only where transformers' own token "
        "was ahead by at most this many nats (a near-tie f16 rounding may flip); any other divergence fails the stage.",
    )
    fail_on_limits: bool = Field(default=False, description="Fail the stage when a quantised type is over its limits (else: reported).")
    lora: bool = Field(default=True, description="Also write every LoRA adapter as a GGUF LoRA (llama.cpp --lora), checked against the merged GGUF.")
    modelfile: bool = Field(default=True, description="Write an Ollama Modelfile per model (FROM, TEMPLATE, stop tokens, system prompt, num_ctx).")
    pre_tokenizer: str | None = Field(
        default=None,
        description="llama.cpp pre-tokenizer name for a tokenizer its converter does not recognise (e.g. `gpt-2`); default: "
        "the converter's own recognition, else derived from tokenizer.json (byte-level BPE → gpt-2).",
    )
    validation_texts: int = Field(default=8, ge=1, description="Validation conversations the next-token distributions are compared on.")
    max_text_tokens: int = Field(default=192, ge=8, description="Longest validation conversation compared, in tokens.")
    threads: int | None = Field(default=None, ge=1, description="CPU threads of llama.cpp's tools and inference; default: all cores.")

    @model_validator(mode="after")
    def _types(self) -> "GGUFSettings":
        if not self.types:
            raise ValueError("types is empty: list at least one GGUF type (e.g. [f16, q8_0, q4_k_m])")
        duplicated = sorted({t for t in self.types if self.types.count(t) > 1})
        if duplicated:
            raise ValueError(f"types lists {duplicated} more than once")
        return self


class ReevalConfig(StrictModel):
    """Task metrics (exact match, token F1) on the test split for the reference and every quantized export."""

    max_examples_per_task: int = Field(default=64, ge=1, description="Test records per task answered by every evaluated export.")
    max_new_tokens: int = Field(default=64, ge=1, description="Longest generated answer, in tokens.")
    batch_size: int = Field(default=16, ge=1, description="Prompts generated together.")


class CardSettings(StrictModel):
    """What the model card (README.md, Hugging Face Hub metadata) says beyond what the run measured."""

    base_model: str | None = Field(
        default=None,
        description="Hub id of the base model for the card's `base_model` (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`). "
        "Default: the trained base when it is a hub id, else the hub id its config.json names (`_name_or_path`); a "
        "locally built base is named in the text only (a local path is no Hub id).",
    )
    license: str | None = Field(default=None, description="SPDX-style Hub licence id of the exported weights (e.g. `apache-2.0`).")
    datasets: list[str] = Field(
        default_factory=list, description="Hub ids of the training datasets, for the card's `datasets` (local data is named by its key)."
    )
    language: list[str] = Field(default_factory=list, description="Languages (ISO 639-1) the model was trained on.")
    model_name: str | None = Field(default=None, description="The model's name in `model-index`; default `<pipeline stage>-<method>`.")


class ExportConfig(StrictModel):
    """Serving artifacts from the `sft` or `align` artifact: adapters, merged model, quantized models, model card."""

    source: Literal["auto", "sft", "align"] = Field(
        default="auto", description="Which trained artifact to export: `auto` takes `align` when the pipeline has it, else `sft`."
    )
    targets: list[Target] | None = Field(
        default=None,
        description="What to export: `adapters`, `merged`, `bnb4`, `bnb8`, `gptq`, `awq`, `gguf`. Default: adapters and merged for "
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
    gguf: GGUFSettings = Field(default_factory=GGUFSettings, description="Settings of the `gguf` target.")
    reeval: ReevalConfig = Field(default_factory=ReevalConfig, description="Re-evaluation of the exports on the test split.")
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig,
        description="How the re-evaluated answers are scored (normalisation, labels per task); default: the pipeline's `scoring:`.",
    )
    card: CardSettings = Field(default_factory=CardSettings, description="The model card's metadata: base model, licence, datasets.")
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
