"""The `base_model:` section: build a small base model locally (no model hub needed).

A byte-level BPE tokenizer is trained on the data artifact's texts, and a Llama-architecture
model is initialised from a config with a fixed seed. The result is an ordinary Hugging Face
model directory, so every later stage loads it exactly like a hub model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tunepipe.schemas.base import StrictModel

# ChatML-like. The `{% generation %}` block marks the assistant's tokens (its end-of-turn token
# included) for `return_assistant_tokens_mask`, which TRL's SFTTrainer uses when
# `assistant_only_loss=True`. No default system prompt: a tiny model should not learn one.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


class SpecialTokens(StrictModel):
    """The tokenizer's special tokens (ids 0.. in this order: unk, bos, pad, eos, additional)."""

    bos: str = Field(default="<s>", description="Beginning-of-sequence token (registered, not added automatically).")
    eos: str = Field(
        default="<|im_end|>",
        description="End-of-sequence token. It is also the chat end-of-turn token, so generation stops after "
        "an answer and trainers append it to plain-text completions.",
    )
    pad: str = Field(default="<pad>", description="Padding token.")
    unk: str = Field(default="<unk>", description="Unknown token (byte-level BPE never needs it; kept for tools that expect one).")
    additional: list[str] = Field(
        default_factory=lambda: ["<|im_start|>"],
        description="Further special tokens, e.g. the chat template's turn opener.",
    )

    def all(self) -> list[str]:
        """Every special token, in id order."""
        return [self.unk, self.bos, self.pad, self.eos, *self.additional]

    @model_validator(mode="after")
    def _distinct(self) -> "SpecialTokens":
        tokens = self.all()
        if any(not t for t in tokens):
            raise ValueError("special tokens must be non-empty strings")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"special tokens must be distinct, got {tokens}")
        return self


class TokenizerSpec(StrictModel):
    """How the byte-level BPE tokenizer is trained."""

    vocab_size: int = Field(
        default=2000, ge=300, le=262144,
        description="Largest vocabulary (256 bytes + special tokens + merges); a small corpus may stop short of it.",
    )
    min_frequency: int = Field(default=2, ge=1, description="A pair must occur this often to become a merge.")
    train_on: list[Literal["corpus", "train"]] = Field(
        default_factory=lambda: ["corpus", "train"],
        min_length=1,
        description="Data artifact texts the tokenizer is trained on: `corpus` (corpus.jsonl) and/or `train` "
        "(every text field of train.jsonl). Validation and test never are.",
    )
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens, description="Special tokens.")
    chat_template: str = Field(
        default=DEFAULT_CHAT_TEMPLATE,
        description="Jinja chat template stored with the tokenizer (default: ChatML-like with `{% generation %}` "
        "markers for assistant-only loss). It must use the special tokens above.",
    )
    model_max_length: int | None = Field(
        default=None, ge=8,
        description="Tokenizer's model_max_length; defaults to architecture.max_position_embeddings.",
    )


class ArchitectureSpec(StrictModel):
    """The Llama-architecture model's dimensions (vocab size comes from the trained tokenizer)."""

    hidden_size: int = Field(default=128, ge=8, description="Width of the residual stream.")
    intermediate_size: int = Field(default=256, ge=8, description="Width of the SwiGLU MLP.")
    num_hidden_layers: int = Field(default=4, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(default=4, ge=1, description="Query heads.")
    num_key_value_heads: int | None = Field(
        default=None, ge=1, description="Key/value heads (grouped-query attention); default: num_attention_heads."
    )
    max_position_embeddings: int = Field(default=512, ge=8, description="Longest sequence the model is configured for.")
    tie_word_embeddings: bool = Field(default=True, description="Share the input embedding and the output head.")
    rope_theta: float = Field(default=10000.0, gt=0, description="RoPE base frequency.")
    rms_norm_eps: float = Field(default=1e-6, gt=0, description="RMSNorm epsilon.")
    initializer_range: float = Field(
        default=0.02,
        gt=0,
        description="Std of the normal weight initialisation. With tied embeddings it also bounds what an adapter "
        "that leaves them frozen (LoRA) can learn: every logit is at most about initializer_range x hidden_size, so "
        "for a small model use ~1/sqrt(hidden_size) (the quickstart: 0.088 at width 128; 0.02 capped its logits at 2.6).",
    )

    @model_validator(mode="after")
    def _heads(self) -> "ArchitectureSpec":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_attention_heads {self.num_attention_heads}"
            )
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be a multiple of num_key_value_heads {kv}")
        return self


class BaseModelConfig(StrictModel):
    """Build a tiny base model locally: a BPE tokenizer trained on the data, a Llama from a config."""

    seed: int = Field(default=42, description="Seed of the weight initialisation (same seed and data: bitwise same model).")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer training settings.")
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec, description="Model dimensions.")

    @model_validator(mode="after")
    def _template_uses_tokens(self) -> "BaseModelConfig":
        if self.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE:
            specials = self.tokenizer.special_tokens
            missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in specials.all()]
            if missing:
                raise ValueError(
                    f"the default chat template uses {missing}, which are not special tokens: add them to "
                    "tokenizer.special_tokens.additional (or set eos to <|im_end|>), or give your own chat_template"
                )
        return self
