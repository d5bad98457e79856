"""Tiny models of the real families users fine-tune: Llama 3.1, Qwen2.5, Qwen3, Mistral v0.3, Gemma 2 and 3, Phi-3.

No hub: each model is built from its family's real config class (so its modelling code, LoRA
target names, tied embeddings, soft-capping and fused projections are the real ones) with
random weights, and each tokenizer is a byte-level BPE trained here on a few sentences, carrying
the family's special tokens, its BOS/EOS/pad settings and a copy of its published chat template.

The templates were written from the published `tokenizer_config.json` files named above each
one. The branches for tool calls are left out (tunepipe's data has no tools); everything a
plain system/user/assistant conversation goes through is as published, including what makes
the family hard: Llama 3.1's BOS and always-present system header, Gemma 2's refusal of a system
message (Gemma 3 folds it into the first user turn) and their `model` role, Mistral's system message folded into the last user turn, Qwen3's
rewriting of earlier assistant turns (it drops past reasoning and marks the last answer with an
empty think block), Phi-3's end-of-text after the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.helpers.training import WORDS, records

# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json `chat_template` (tool branches left out).
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen/Qwen2.5-0.5B-Instruct, tokenizer_config.json `chat_template` (tool branches left out).
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B, tokenizer_config.json `chat_template` (tool branches left out).
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json `chat_template` (tool branches left out).
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- set ns.index = ns.index + 1 %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# google/gemma-2-2b-it, tokenizer_config.json `chat_template` (verbatim).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json `chat_template` (verbatim).
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


# google/gemma-3-1b-it, tokenizer_config.json `chat_template` (verbatim): a system message is folded into the first
# user turn instead of refused.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class Family:
    """One model family: its tokenizer's special tokens and settings, its config, its generation config."""

    name: str
    template: str
    specials: list[str]  # every special token, in id order after the byte-level alphabet
    bos: str | None
    eos: str  # the tokenizer's eos_token
    pad: str | None  # None: the published tokenizer has no pad token
    unk: str | None
    end_of_turn: str  # the token that ends an assistant turn
    generation_eos: list[str]  # generation_config.eos_token_id, as published
    adds_bos: bool  # plain `tokenizer(text)` prepends BOS (the post-processor)
    config: Callable[[dict[str, int | None], int], Any]
    system_ok: bool = True
    rewrites_history: bool = False  # the template renders earlier assistant turns differently later on
    added: list[str] = field(default_factory=list)  # added tokens that are not special (decoding keeps them), after `specials`
    notes: list[str] = field(default_factory=list)


# Head size 32 (128 / 4 heads): the smallest vLLM's CPU attention serves (its CPU_ATTN backend's list).
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512,
        # Larger than the published 0.02: random tied embeddings that small give near-uniform logits a
        # rank-8 adapter cannot sharpen in a few steps (real checkpoints have trained, larger embeddings).
        "initializer_range": 0.1}


def _llama3(ids, vocab):
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}  # 8192 published; below the tiny context
    return LlamaConfig(vocab_size=vocab, rope_parameters=rope, tie_word_embeddings=False, rms_norm_eps=1e-5, **TINY, **ids)


def _qwen2(ids, vocab):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       rms_norm_eps=1e-6, **TINY, **ids)


def _qwen3(ids, vocab):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **TINY, **ids)


def _mistral(ids, vocab):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, sliding_window=None, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **TINY, **ids)


def _gemma2(ids, vocab):
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, head_dim=32, query_pre_attn_scalar=32, sliding_window=32,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh", **TINY, **ids)


def _gemma3(ids, vocab):
    from transformers import Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return Gemma3TextConfig(vocab_size=vocab, head_dim=32, query_pre_attn_scalar=32, sliding_window=32, tie_word_embeddings=True,
                            hidden_activation="gelu_pytorch_tanh", rope_parameters=rope, **TINY, **ids)


def _phi3(ids, vocab):
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      original_max_position_embeddings=512, **TINY, **ids)


FAMILIES: dict[str, Family] = {
    "llama3": Family(
        "llama3", LLAMA31_TEMPLATE,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eom_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, end_of_turn="<|eot_id|>",
        generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], adds_bos=True, config=_llama3,
        notes=["template emits BOS and the tokenizer adds one too", "no pad token (the reserved pad token is chosen)", "llama3 rope scaling"],
    ),
    "qwen2.5": Family(
        "qwen2.5", QWEN25_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, end_of_turn="<|im_end|>",
        generation_eos=["<|im_end|>", "<|endoftext|>"], adds_bos=False, config=_qwen2,
        notes=["no BOS", "q/k/v biases", "tied embeddings", "default system prompt"],
    ),
    "qwen3": Family(
        "qwen3", QWEN3_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, end_of_turn="<|im_end|>",
        generation_eos=["<|im_end|>", "<|endoftext|>"], adds_bos=False, config=_qwen3, rewrites_history=True,
        added=["<think>", "</think>"],  # "special": false in the published tokenizer_config.json: decoding keeps them
        notes=["rewrites earlier assistant turns (multi-turn rows are split per turn)", "think block before every answer",
               "q/k norms", "tied embeddings"],
    ),
    "mistral": Family(
        "mistral", MISTRAL_V03_TEMPLATE, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        bos="<s>", eos="</s>", pad=None, unk="<unk>", end_of_turn="</s>",
        generation_eos=["</s>"], adds_bos=True, config=_mistral, system_ok=False,
        notes=["shows a system message only in the last user turn (refused in training data)", "no pad token (unk chosen)"],
    ),
    "gemma2": Family(
        "gemma2", GEMMA2_TEMPLATE, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", end_of_turn="<end_of_turn>",
        generation_eos=["<eos>", "<end_of_turn>"], adds_bos=True, config=_gemma2, system_ok=False,
        notes=["refuses a system message", "end of turn differs from eos", "soft-capping: eager attention", "tied embeddings"],
    ),
    "gemma3": Family(
        "gemma3", GEMMA3_TEMPLATE, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", end_of_turn="<end_of_turn>",
        generation_eos=["<eos>", "<end_of_turn>"], adds_bos=True, config=_gemma3,
        notes=["folds a system message into the first user turn", "end of turn differs from eos", "sliding-window layers",
               "q/k norms", "tied embeddings"],
    ),
    "phi3": Family(
        "phi3", PHI3_TEMPLATE, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
        bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", end_of_turn="<|end|>",
        generation_eos=["<|endoftext|>", "<|assistant|>", "<|end|>"], adds_bos=False, config=_phi3, rewrites_history=True,
        notes=["fused qkv_proj / gate_up_proj", "end of turn differs from eos", "eos after the conversation"],
    ),
}


def tokenizer_texts() -> list[str]:
    texts = [" ".join(WORDS)] * 3
    texts += [f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in records("train") if "instruction" in r]
    texts += ["Be brief. Answer the question. Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
              "You are Qwen, created by Alibaba Cloud. You are a helpful assistant. system user assistant model"]
    return texts


def build_tokenizer(family: Family):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=1, special_tokens=family.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(tokenizer_texts(), trainer)
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added])
    if family.adds_bos:
        raw.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[(family.bos, raw.token_to_id(family.bos))]
        )
    else:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {family.bos, family.eos, family.pad, family.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad, unk_token=family.unk,
        additional_special_tokens=[t for t in family.specials if t not in named],
        chat_template=family.template, model_max_length=512, padding_side="left" if family.name == "phi3" else "right",
        clean_up_tokenization_spaces=False,
    )


# The tokenizer classes of the published sentencepiece checkpoints, for `build_sentencepiece_tokenizer`. Phi-3 is
# not here: llama.cpp hard-codes its published tokenizer's rstrip of the turn markers and its prefix space after
# them, which the tests' Phi-3 tokenizer does not have, so its GGUF prompts would differ from training's.
SENTENCEPIECE_CLASS = {"gemma2": "GemmaTokenizer"}


def build_sentencepiece_tokenizer(family: Family, path: Path):
    """The family's tokenizer as its published checkpoint ships it: a sentencepiece `tokenizer.model` (BPE, byte
    fallback, no prefix space, trained here on the same sentences) that transformers converts, for llama.cpp's
    converters that read only that file (Gemma 2). The special tokens keep their published ids (Gemma: pad 0,
    eos 1, bos 2, unk 3, then the turn markers as user-defined symbols)."""
    import io
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    named = [family.pad, family.eos, family.bos, family.unk]
    assert family.specials[:4] == named, f"{family.name}: the sentencepiece fixture expects pad, eos, bos, unk first"
    user = family.specials[4:]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_texts()), model_writer=model, model_type="bpe", vocab_size=420, hard_vocab_limit=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=family.pad, eos_piece=family.eos, bos_piece=family.bos, unk_piece=family.unk,
        user_defined_symbols=user, byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True, num_threads=1, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": SENTENCEPIECE_CLASS[family.name], "bos_token": family.bos, "eos_token": family.eos,
        "pad_token": family.pad, "unk_token": family.unk, "add_bos_token": family.adds_bos, "add_eos_token": False,
        "additional_special_tokens": user, "model_max_length": 512, "padding_side": "right", "clean_up_tokenization_spaces": False}))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = family.template
    return tokenizer


def build_family_model(family: Family | str, path: Path, *, sentencepiece: bool = False) -> Path:
    """Save a tiny random model of `family` with its tokenizer and generation config under `path` (`sentencepiece`:
    the tokenizer as a sentencepiece tokenizer.model, see `build_sentencepiece_tokenizer`)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[family] if isinstance(family, str) else family
    tokenizer = build_sentencepiece_tokenizer(family, path) if sentencepiece else build_tokenizer(family)
    tid = tokenizer.convert_tokens_to_ids
    ids = {"bos_token_id": tid(family.bos) if family.bos else None, "eos_token_id": [tid(t) for t in family.generation_eos],
           "pad_token_id": tid(family.pad) if family.pad else None}
    config = family.config(ids, len(tokenizer))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**{k: v for k, v in ids.items() if v is not None})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_CACHE: dict[str, Path] = {}


def family_model(name: str, root: Path) -> Path:
    """The family's tiny model, built once per test session under `root`."""
    if name not in _CACHE:
        _CACHE[name] = build_family_model(name, root / name)
    return _CACHE[name]
