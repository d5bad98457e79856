"""The `base_model` stage: a tokenizer trained on the data and a Llama initialised from a config.

Input `data` (the data stage's artifact). Output: an ordinary Hugging Face model directory
(config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja) that `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` load as is.

Deterministic: the same data and config give a bitwise-identical tokenizer and weights (BPE
training is deterministic; weights come from a seeded CPU initialisation in float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from tunepipe.schemas.base_model import BaseModelConfig
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import Stage, StageContext, StageFailed, StageOutput
from tunepipe.tasks.lm.modeling import llama_config, load_model, load_tokenizer

# Text fields of data artifact records (instruction, chat, preference and text records).
_TEXT_FIELDS = ("system", "instruction", "input", "output", "prompt", "completion", "chosen", "rejected", "text")
_PROBE_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "hi"},
]


def record_texts(record: dict[str, Any]) -> Iterator[str]:
    """Every non-empty text of a data record: instruction/input/output, chat turns, text."""
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            yield value
    for message in record.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content.strip():
            yield content


def read_texts(data_dir: Path, sources: list[str]) -> dict[str, list[str]]:
    """Texts per source (`corpus`: corpus.jsonl, `train`: train.jsonl) of a data artifact."""
    files = {"corpus": "corpus.jsonl", "train": "train.jsonl"}
    return {
        source: [text for record in read_jsonl(data_dir / files[source]) for text in record_texts(record)]
        for source in sources
    }


def train_tokenizer(texts: list[str], config: BaseModelConfig):
    """A byte-level BPE tokenizer (a `tokenizers.Tokenizer`) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    spec = config.tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=spec.min_frequency,
        special_tokens=spec.special_tokens.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def wrap_tokenizer(tokenizer, config: BaseModelConfig):
    """The trained tokenizer as a transformers fast tokenizer with special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    spec = config.tokenizer
    special = spec.special_tokens
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special.bos,
        eos_token=special.eos,
        pad_token=special.pad,
        unk_token=special.unk,
        additional_special_tokens=list(special.additional),
        chat_template=spec.chat_template,
        model_max_length=spec.model_max_length or config.architecture.max_position_embeddings,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )



def build_model(config: BaseModelConfig, tokenizer):
    """A randomly initialised LlamaForCausalLM (float32, CPU, seeded) sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    model_config = llama_config(
        config,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a private generator state: the global RNG state is restored afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def fertility(tokenizer, texts: list[str]) -> float:
    """Tokens per whitespace-separated word over `texts` (lower: the vocabulary fits the data)."""
    words = sum(len(t.split()) for t in texts)
    if not words:
        return 0.0
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / words


def check_chat_template(tokenizer) -> str:
    """Render a probe conversation; a template that fails here would fail in every later stage."""
    try:
        rendered = tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=False)
        masked = tokenizer.apply_chat_template(
            _PROBE_MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:  # jinja errors come in many classes
        raise StageFailed(f"base_model: the chat template does not render: {type(exc).__name__}: {exc}") from exc
    if "Say hi." not in rendered or "hi" not in rendered:
        raise StageFailed(f"base_model: the chat template drops message content: {rendered!r}")
    if not any(masked.get("assistant_masks") or []):
        raise StageFailed(
            "base_model: the chat template marks no assistant tokens: wrap the assistant's content (and its "
            "end-of-turn token) in {% generation %}...{% endgeneration %} for assistant-only loss"
        )
    return rendered


class BaseModelStage(Stage):
    """Train the tokenizer, initialise the model, save both as a Hugging Face model directory."""

    name = "base_model"
    config_model = BaseModelConfig

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        return {}  # always built on CPU in float32: the hardware profile does not change it

    def run(self, config: BaseModelConfig, ctx: StageContext) -> StageOutput:
        data_dir = Path(ctx.inputs["data"].path)
        texts_by_source = read_texts(data_dir, config.tokenizer.train_on)
        texts = [t for source in config.tokenizer.train_on for t in texts_by_source[source]]
        if not texts:
            raise StageFailed(
                f"base_model: no texts to train the tokenizer on in {data_dir} "
                f"(looked for {', '.join(config.tokenizer.train_on)}: "
                + ", ".join(f"{s}={len(v)}" for s, v in texts_by_source.items())
                + ")"
            )
        ctx.logger.info(
            "base_model: training a %d-token BPE on %d texts (%s)",
            config.tokenizer.vocab_size, len(texts),
            ", ".join(f"{s}: {len(v)}" for s, v in texts_by_source.items()),
        )
        tokenizer = wrap_tokenizer(train_tokenizer(texts, config), config)
        check_chat_template(tokenizer)
        model = build_model(config, tokenizer)

        out = ctx.staging_dir
        tokenizer.save_pretrained(out)
        model.save_pretrained(out)
        self._verify(out, model, tokenizer)

        n_params = sum(p.numel() for p in model.parameters())
        train_texts = texts_by_source.get("train") or texts
        fert = fertility(tokenizer, train_texts)
        metrics = {
            "vocab_size": len(tokenizer),
            "num_parameters": n_params,
            "fertility": round(fert, 4),
            "tokenizer_texts": len(texts),
            "tokenizer_chars": sum(len(t) for t in texts),
            "hidden_size": config.architecture.hidden_size,
            "num_hidden_layers": config.architecture.num_hidden_layers,
        }
        table = [
            {"property": "vocabulary", "value": f"{len(tokenizer)} tokens (cap {config.tokenizer.vocab_size})"},
            {"property": "parameters", "value": f"{n_params:,}"},
            {"property": "fertility", "value": f"{fert:.3f} tokens/word on {'train' if texts_by_source.get('train') else 'tokenizer'} texts"},
            {"property": "architecture", "value": _arch_line(config)},
            {"property": "tokenizer trained on", "value": ", ".join(f"{s} ({len(v)} texts)" for s, v in texts_by_source.items())},
        ]
        summary = (
            f"Built a {n_params / 1e6:.2f}M-parameter Llama ({_arch_line(config)}) with a "
            f"{len(tokenizer)}-token byte-level BPE tokenizer ({fert:.2f} tokens/word), seed {config.seed}."
        )
        return StageOutput(metrics=metrics, summary=summary, table=table)

    @staticmethod
    def _verify(out: Path, model, tokenizer) -> None:
        """Load the directory back with the plain Auto classes; the logits must match."""
        import torch

        loaded_tok = load_tokenizer(out)
        loaded = load_model(out, dtype="float32")
        ids = loaded_tok.apply_chat_template(_PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"]
        if ids != tokenizer.apply_chat_template(_PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"]:
            raise StageFailed("base_model: the saved tokenizer encodes differently from the trained one")
        batch = torch.tensor([ids])
        with torch.no_grad():
            same = torch.equal(model.eval()(batch).logits, loaded.eval()(batch).logits)
        if not same:
            raise StageFailed("base_model: the saved model does not reproduce the built model's logits")


def _arch_line(config: BaseModelConfig) -> str:
    a = config.architecture
    kv = a.num_key_value_heads or a.num_attention_heads
    return (
        f"{a.num_hidden_layers} layers, hidden {a.hidden_size}, MLP {a.intermediate_size}, "
        f"{a.num_attention_heads} heads ({kv} kv), context {a.max_position_embeddings}"
    )
