"""Data artifact records → token ids and labels, with the loss mask and truncation made explicit.

Every record becomes a conversation (`messages`; instruction/input/output records become
system? + user + assistant), rendered with the chosen chat template. Labels are -100 outside
the assistant's turns unless `train_on_inputs`. The assistant spans come from rendering each
prefix of the conversation, so any template works whose rendering of a prefix is a prefix of
the whole (every common chat template is). Over-long examples are cut, dropped or refused, and
always counted.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.schemas.sft import NAMED_CHAT_TEMPLATES
from tunepipe.tasks.core.jsonl import read_jsonl
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.checks import require

IGNORE = -100
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


def read_split(data_dir: str | Path, split: str) -> list[dict[str, Any]]:
    """The records of one split of a data artifact (empty when the file is absent)."""
    return read_jsonl(Path(data_dir) / SPLIT_FILES[split])


def record_messages(record: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """A record as a conversation: chat records as they are, instruction records as user + assistant."""
    if record.get("messages"):
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "instruction" in record and "output" in record:
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise StageFailed(f"record {record.get('id', '?')}: neither `messages` nor instruction/output fields")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if not any(m["role"] == "assistant" for m in messages):
        raise StageFailed(f"record {record.get('id', '?')}: no assistant turn to train on")
    return messages


def resolve_chat_template(spec: str, tokenizer: Any) -> str:
    """`model` → the tokenizer's template; a name → the bundled one; a .jinja path → its text; else the string."""
    if spec == "model":
        if not tokenizer.chat_template:
            raise StageFailed(
                "chat_template: model, but the model's tokenizer has no chat template: set chat_template to "
                f"one of {', '.join(NAMED_CHAT_TEMPLATES)} or give a Jinja template"
            )
        return tokenizer.chat_template
    if spec in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[spec]
    if spec.endswith((".jinja", ".j2")) and "{" not in spec:
        path = Path(spec)
        if not path.is_file():
            raise StageFailed(f"chat_template: {spec}: no such file")
        return path.read_text()
    return spec


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation this row renders


def model_family(tokenizer: Any) -> str:
    """The model family a tokenizer belongs to, for messages: `model_type` from the config.json next
    to it (e.g. `gemma2`), else the tokenizer's directory or hub name."""
    name = str(getattr(tokenizer, "name_or_path", "") or "")
    config = Path(name) / "config.json"
    if name and config.is_file():
        try:
            return str(json.loads(config.read_text()).get("model_type") or name)
        except ValueError:
            pass
    return name or type(tokenizer).__name__


# Data is text: a control token's string in a message (`<|im_start|>system ...` in an instruction, a
# `</s>` in a scraped page) must not become the real control token, or data injects turns and ends
# sequences in training, evaluation and serving alike. Every conversation is rendered through
# `data_messages`, which breaks each special token's string in message contents with a zero-width
# space after its first character: the tokenizer then reads it as ordinary text tokens (the same
# text for every engine: vLLM tokenizes the rendered prompt as it is), and the template's own control
# tokens stay the only ones. Non-special added tokens (Qwen3's `<think>`) are content and stay.
ESCAPE = "\u200b"
_CONTROL_PATTERNS: "weakref.WeakKeyDictionary[Any, re.Pattern | None]" = weakref.WeakKeyDictionary()


def _control_pattern(tokenizer: Any) -> re.Pattern | None:
    try:
        return _CONTROL_PATTERNS[tokenizer]
    except (KeyError, TypeError):
        pass
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    tokens = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
    try:
        _CONTROL_PATTERNS[tokenizer] = pattern
    except TypeError:  # not weak-referenceable: computed per call
        pass
    return pattern


def data_text(tokenizer: Any, text: str) -> str:
    """`text` with every special token's string broken (see ESCAPE), so it tokenizes as text."""
    pattern = _control_pattern(tokenizer)
    if pattern is None or not isinstance(text, str):
        return text
    return pattern.sub(lambda m: m.group(0)[0] + ESCAPE + m.group(0)[1:], text)


def data_messages(tokenizer: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation whose contents tokenize as text under `tokenizer` (see `data_text`)."""
    return [{**m, "content": data_text(tokenizer, m["content"])} if isinstance(m.get("content"), str) else m for m in messages]


class TemplateRefused(StageFailed):
    """The chat template raised on a conversation (a role it does not take, roles out of order)."""


def render_messages(tokenizer: Any, template: str, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    """The template's text for a conversation, its contents tokenizing as text (`data_messages`).
    A template that refuses the conversation (Gemma takes no system message; Mistral and Gemma need
    user/assistant alternation) becomes a `TemplateRefused` naming the family and the template's
    own reason, not a Jinja traceback."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            data_messages(tokenizer, messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except TemplateError as exc:
        roles = ", ".join(m["role"] for m in messages)
        hint = (
            " (drop the system message: leave sft.system_prompt unset and remove `system` from the data, or pick "
            "another chat_template)" if any(m["role"] == "system" for m in messages) and "system" in str(exc).lower() else ""
        )
        raise TemplateRefused(
            f"the {model_family(tokenizer)} chat template refuses a conversation with roles [{roles}]: {exc}{hint}"
        ) from None


def encode_text(tokenizer: Any, text: str, *, offsets: bool = False) -> Any:
    """Token ids of rendered chat text, as every stage and the server tokenize it.

    The template owns the special tokens: a template that emits BOS has it in the text, so the
    tokenizer must not add another (the double-BOS of Llama 3 and Gemma checkpoints). This is what
    `apply_chat_template(tokenize=True)` and vLLM's chat endpoint do: `add_special_tokens=False`.
    """
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _turn_spans(tokenizer: Any, template: str, messages: list[dict[str, str]], text: str) -> tuple[list[tuple[int, int]], list[int]]:
    """Character spans of the assistant turns whose rendering is a prefix of the whole `text`,
    and the indices of those whose is not (the template rewrites them once later turns exist)."""
    spans: list[tuple[int, int]] = []
    unstable: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_messages(tokenizer, template, messages[:i], True) if i else ""
        upto = render_messages(tokenizer, template, messages[: i + 1], False)
        if text.startswith(upto) and upto.startswith(before):
            spans.append((len(before), len(upto)))
        else:
            unstable.append(i)
    return spans, unstable


def encode_conversation(
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, max_length: int | None, train_on_inputs: bool
) -> list[Encoded]:
    """Token ids and labels of one conversation (labels -100 outside assistant turns).

    Usually one row. A template that renders an earlier assistant turn differently once later
    turns exist (Qwen3 drops past reasoning, Phi-3 ends a conversation with eos) gives one row per
    assistant turn instead: the conversation up to that turn, rendered as the server renders it
    when that turn is asked for, with loss on that turn only. A template whose rendering of the
    prompt before the last answer is not the prompt it serves (Mistral v0.3 shows the system
    message only while a user turn is last) cannot be trained to match serving: refused.
    """
    text = render_messages(tokenizer, template, messages, False)
    spans, unstable = _turn_spans(tokenizer, template, messages, text)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last in unstable:
        roles = ", ".join(m["role"] for m in messages)
        raise StageFailed(
            f"the {model_family(tokenizer)} chat template renders the conversation before the last answer (roles [{roles}]) "
            "differently from the prompt it serves for it (it moves or drops a message, e.g. a system message it only shows "
            "in the last user turn), so training would not see what serving sends: drop the system message or use another "
            "chat_template"
        )
    if not unstable:
        return [_encode(tokenizer, text, spans, messages, max_length=max_length, train_on_inputs=train_on_inputs)]
    rows = []
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
        prefix = messages[: i + 1]
        prefix_text = render_messages(tokenizer, template, prefix, False)
        prefix_spans, prefix_unstable = _turn_spans(tokenizer, template, prefix, prefix_text)
        if i in prefix_unstable:
            return encode_conversation(tokenizer, template, prefix, max_length=max_length, train_on_inputs=train_on_inputs)  # raises
        rows.append(_encode(tokenizer, prefix_text, prefix_spans[-1:], prefix, max_length=max_length, train_on_inputs=train_on_inputs))
    return rows


def _encode(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], messages: list[dict[str, str]], *, max_length: int | None,
    train_on_inputs: bool,
) -> Encoded:
    enc = encode_text(tokenizer, text, offsets=True)
    ids = list(enc["input_ids"])
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [
            tok if any(start <= a < end for start, end in spans) and b > a else IGNORE
            for tok, (a, b) in zip(ids, enc["offset_mapping"])
        ]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(ids, labels, truncated, messages)


def end_of_turn_token(tokenizer: Any, template: str) -> int | None:
    """The token the template puts right after an assistant's answer (`<|eot_id|>`, `<end_of_turn>`,
    `<|im_end|>`, `<|end|>`, `</s>`): found by rendering a probe conversation, not from a table.
    None when no special token follows the answer."""
    probe = "zq"
    try:
        text = render_messages(tokenizer, template, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], False)
    except StageFailed:
        return None
    after = text[text.rfind(probe) + len(probe):]
    special = set(tokenizer.all_special_ids)
    for token in encode_text(tokenizer, after)["input_ids"]:
        if token in special:
            return int(token)
    return None


def stop_token_ids(tokenizer: Any, generation_config: Any = None, template: str | None = None) -> list[int]:
    """Every token that ends generation: the model's `generation_config.eos_token_id` (a list for
    Llama 3, Gemma, Phi-3, Qwen), the tokenizer's eos, and the template's end-of-turn token."""
    ids: list[int] = []
    eos = getattr(generation_config, "eos_token_id", None)
    for token in (eos if isinstance(eos, list) else [eos]):
        if token is not None and token not in ids:
            ids.append(int(token))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    template = template or getattr(tokenizer, "chat_template", None)
    if template and (eot := end_of_turn_token(tokenizer, template)) is not None and eot not in ids:
        ids.append(eot)
    return ids


# Reasoning families (Qwen3, QwQ, DeepSeek-R1 and their distillations) answer after a `<think>...</think>`
# block, which their templates render into the assistant turn (Qwen3 an empty one when there is no
# reasoning): the tags are ordinary added tokens there, so decoding keeps them in the text.
REASONING_START, REASONING_END = "<think>", "</think>"


def reasoning_end(tokenizer: Any) -> str | None:
    """`</think>` when the tokenizer has it as one token (a reasoning family), else None."""
    return REASONING_END if REASONING_END in tokenizer.get_vocab() else None


def final_answer(text: str, end: str | None) -> str:
    """The answer in a generated text: with a reasoning marker `end`, what follows its last occurrence (as
    lm-eval's `think_end_token` does), or "" while the reasoning is still open (it ran out of tokens);
    the whole text otherwise. Stripped either way."""
    if end is None:
        return text.strip()
    if end in text:
        return text.split(end)[-1].strip()
    return "" if text.lstrip().startswith(REASONING_START) else text.strip()


@dataclass
class SplitStats:
    """What happened to one split's records."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    split_turns: int = 0  # conversations split into one row per assistant turn (see encode_conversation)
    tokens: int = 0
    target_tokens: int = 0
    per_task: Counter = field(default_factory=Counter)
    label_mask_failed: int = 0  # rows whose label_mask self-check failed and was set to warn (kept)
    label_mask_problem: str | None = None  # the first such row's problem

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "kept": self.kept, "truncated": self.truncated,
            "dropped_overlong": self.dropped_overlong, "dropped_no_target": self.dropped_no_target,
            "split_turns": self.split_turns, "tokens": self.tokens, "target_tokens": self.target_tokens, "per_task": dict(self.per_task),
        }


def encode_records(
    records: list[dict[str, Any]],
    tokenizer: Any,
    template: str,
    *,
    max_length: int,
    train_on_inputs: bool,
    overlong: str = "truncate",
    system_prompt: str | None = None,
    split: str = "train",
    policy: Any = None,
) -> tuple[dict[str, list[dict[str, list[int]]]], SplitStats]:
    """Encode records grouped by task: ({task: [{input_ids, labels}]}, stats). A row failing the
    `label_mask` self-check fails the stage, unless `policy` (a checks.CheckPolicy) sets it to warn:
    then the first is logged and the rest counted."""
    by_task: dict[str, list[dict[str, list[int]]]] = {}
    stats = SplitStats()
    for record in records:
        stats.examples += 1
        try:
            rows = encode_conversation(
                tokenizer, template, record_messages(record, system_prompt), max_length=max_length, train_on_inputs=train_on_inputs
            )
        except StageFailed as exc:
            raise type(exc)(f"{split} record {record.get('id', '?')}: {exc}") from None
        stats.split_turns += len(rows) > 1
        for enc in rows:
            if enc.truncated:
                if overlong == "fail":
                    raise StageFailed(
                        f"{split} record {record.get('id', '?')} is longer than max_length {max_length} tokens "
                        "(overlong: fail): raise max_length, or set overlong to truncate or drop"
                    )
                if overlong == "drop":
                    stats.dropped_overlong += 1
                    continue
                stats.truncated += 1
            if not enc.truncated and not train_on_inputs:
                if problem := label_mask_problem(tokenizer, template, enc):
                    why = f"{split} record {record.get('id', '?')}: {problem}"
                    if stats.label_mask_problem is None:
                        require("label_mask", {"passed": False}, why, policy)  # raises unless set to warn
                        stats.label_mask_problem = why
                    stats.label_mask_failed += 1
            if all(label == IGNORE for label in enc.labels):
                stats.dropped_no_target += 1  # truncation cut away the whole answer: no loss to learn from
                continue
            task = str(record.get("task") or "default")
            by_task.setdefault(task, []).append({"input_ids": enc.input_ids, "labels": enc.labels})
            stats.kept += 1
            stats.per_task[task] += 1
            stats.tokens += len(enc.input_ids)
            stats.target_tokens += sum(label != IGNORE for label in enc.labels)
    return by_task, stats


def encode_texts(
    texts: list[str], tokenizer: Any, *, max_length: int | None
) -> tuple[list[dict[str, list[int]]], int]:
    """Plain documents for language modelling (loss on every token, EOS appended): (rows, truncated)."""
    rows, truncated = [], 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        # A document is text throughout: a control token's string in it is not the control token.
        ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + eos
        if max_length is not None and len(ids) > max_length:
            ids, truncated = ids[:max_length], truncated + 1
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows, truncated


def label_mask_problem(tokenizer: Any, template: str, enc: Any) -> str | None:
    """Why a row's labels are not exactly its last assistant answer (None when they are)."""
    ids, labels, messages = enc.input_ids, enc.labels, enc.messages
    if problem := extra_bos(tokenizer, template, enc):
        return problem
    labeled = [i for i, label in enumerate(labels) if label != IGNORE]
    if not labeled:
        return "no token is labeled: the assistant's answer was not found in the rendering"
    if any(labels[i] != ids[i] for i in labeled):
        return "labels differ from the input ids they should copy"
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render_messages(tokenizer, template, messages[:last], True) if last else ""
    prompt_ids = list(encode_text(tokenizer, prompt)["input_ids"])
    if ids[: len(prompt_ids)] != prompt_ids:
        return "the row does not start with the prompt as the server would render it"
    answer_labeled = [i for i in labeled if i >= len(prompt_ids)]
    if not answer_labeled:
        return "the last assistant answer has no labeled token"
    if any(i < len(prompt_ids) for i in labeled) and _labels_prompt_tokens(tokenizer, template, messages, labels, len(prompt_ids)):
        return "labels cover prompt (system/user/template) tokens"
    start, end = answer_labeled[0], answer_labeled[-1] + 1
    if any(labels[i] == IGNORE for i in range(start, end)):
        return "the answer's labels have holes"
    text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
    if messages[last]["content"].strip() not in text:
        return f"the labeled text {text!r} does not hold the answer {messages[last]['content']!r}"
    eot = end_of_turn_token(tokenizer, template)
    if eot is not None and eot not in ids[start:end]:
        return f"the end-of-turn token {tokenizer.convert_ids_to_tokens(eot)!r} is not labeled, so the model never learns to stop"
    return None


def extra_bos(tokenizer: Any, template: str, enc: Any) -> str | None:
    """A BOS in the row that the template did not render: one the tokenizer added, or one carried in the
    data's text. The template's own count is what its rendering holds outside the messages' contents
    (Llama 3 renders one; ChatML models whose BOS is `<|im_start|>` render one per turn)."""
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    if bos_id is None or not bos:
        return None
    in_row = enc.input_ids.count(bos_id)
    rendered = render_messages(tokenizer, template, enc.messages, False)
    in_contents = sum(str(m.get("content") or "").count(bos) for m in enc.messages)
    from_template = rendered.count(bos) - in_contents
    if in_row <= from_template:
        return None
    cause = (f"the data's text holds {in_contents} {bos!r}, which tokenizes as the special token" if in_contents
             else "the tokenizer added BOS to text the template had rendered")
    return f"{in_row} BOS tokens ({bos!r}) in one row where the template renders {from_template}: {cause}"


def _labels_prompt_tokens(tokenizer: Any, template: str, messages: list[dict[str, str]], labels: list[int], prompt_len: int) -> bool:
    """True when a token labeled before the last answer lies outside every earlier assistant answer."""
    allowed: set[int] = set()
    for i, m in enumerate(messages[:-1]):
        if m["role"] != "assistant":
            continue
        start = len(encode_text(tokenizer, render_messages(tokenizer, template, messages[:i], True))["input_ids"]) if i else 0
        end = len(encode_text(tokenizer, render_messages(tokenizer, template, messages[: i + 1], False))["input_ids"])
        allowed.update(range(start, end))
    return any(labels[i] != IGNORE and i not in allowed for i in range(prompt_len))


def prompt_batches(tokenizer: Any, prompts: list[str], device: Any, batch_size: int = 8) -> list[dict[str, Any]]:
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [list(encode_text(tokenizer, p)["input_ids"]) for p in prompts[start : start + batch_size]]
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        import torch

        out.append({
            "input_ids": torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device),
        })
    return out
