"""One base model, many LoRA adapters, batched generation across adapters (transformers + peft).

The base is wrapped in a `PeftModel` holding every loaded adapter in a slot (a peft adapter
named `slot-N`); one `generate` call serves a batch whose rows use different adapters through
peft's `adapter_names=` (rows of the base model use `__base__`). An unloaded adapter's slot is
kept and refilled by the next adapter of the same shape, so a hot swap is a weight copy.

Besides LoRA (what vLLM serves too), the engine serves tunepipe's bottleneck adapters (sft
methods adapter, adapter_drop, mam_adapter, unipelt, adapter_fusion: a PEFT method of its own,
tasks/lm/bottleneck.py), which vLLM cannot. One PeftModel holds adapters of one PEFT type
only, so each type ("family") gets its own PeftModel over its own copy of the base, loaded when
its first adapter arrives; a batch with rows of both families runs one `generate` per family. All
model work (generation, loading, unloading) runs on one worker thread (see batcher.py), so an
adapter never changes under a running batch.

Per-row bookkeeping (the row's own `max_tokens`, stop strings, streamed text) is a
`StoppingCriteria`: generate calls it after every decoding step with all rows' tokens and lets it
finish rows one by one, which is what a batch of requests with different limits needs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import StoppingCriteria
from tunepipe.tasks.lm.encoding import TemplateRefused, encode_text, render_messages, stop_token_ids
from tunepipe.tasks.lm.modeling import load_model, load_tokenizer
from tunepipe.tasks.serving.grammar import Grammars
from tunepipe.tasks.serving.tools import render_with_tools

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
# Unloaded adapters' slots kept for reuse. Loading into a new slot is peft's module injection,
# ~0.4-0.5 s for a 0.5B model's 168 linear layers whatever the rank (benchmarks/README.md,
# serving); refilling a slot of the same shape is a weight copy.
MAX_FREE_SLOTS = 4
# adapter_config.json keys that do not change a loaded adapter's layers or its forward pass.
_NOT_SHAPE = ("base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "lora_dropout", "peft_version")


def slot_shape(config: Any) -> str:
    """What a slot must match to take an adapter's weights: rank, alpha, targets, scaling, bias..."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_SHAPE}
    if isinstance(fields.get("target_modules"), (set, list, tuple)):
        fields["target_modules"] = sorted(fields["target_modules"])
    return json.dumps(fields, sort_keys=True, default=str)


# Emitted by a row as it runs: ("delta", text) zero or more times, then ("done", finish_reason, tokens).
Emit = Callable[[tuple], None]


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why (and what vLLM would say)."""


@dataclass
class Sampling:
    """How a row picks tokens. Rows batch together only when these are equal."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def batch_key(self, unique: int) -> tuple:
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            # A seeded sample is reproducible only alone: rows in one batch share the RNG stream.
            return ("seeded", unique)
        return ("sample", self.temperature, self.top_p or 1.0)

    def generate_kwargs(self) -> dict[str, Any]:
        if self.greedy:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p or 1.0, "top_k": 0}


@dataclass
class Row:
    """One request's sequence in a batch."""

    prompt_ids: list[int]
    adapter: str | None  # None: the base model
    max_tokens: int
    emit: Emit
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # log-probabilities of each generated token with this many alternatives; None: off
    echo: bool = False  # also the prompt's tokens' log-probabilities (completions' echo)
    grammar: Any = None  # an xgrammar GrammarMatcher the answer must follow (response_format), or None
    cancelled: bool = False  # set by the HTTP side when the client goes away
    # False keeps special tokens in the text: a tool call's markers are special tokens in some families (vLLM's
    # hermes parser turns skipping off likewise)
    skip_special_tokens: bool = True
    tokens: list[int] = field(default_factory=list)  # the answer's tokens (an end-of-sequence token excluded)
    # Tokens the model produced, the end-of-sequence token included: the usage's completion_tokens, counted as
    # vLLM counts them (an answer ending in EOS is one token longer than its text's tokens).
    generated: int = 0
    text: str = ""
    # (token, its log-probability, [(alternative, log-probability)] best first) per generated token, EOS included,
    # from the model's raw logits (before temperature or top_p), as vLLM reports them
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]]]] = field(default_factory=list)
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# PEFT types the engine serves: LORA (vLLM serves it too) and tunepipe's bottleneck adapters.
SERVED_FAMILIES = ("LORA", "BOTTLENECK")


def adapter_family(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type))


def adapter_rank(config: Any) -> int:
    """The LoRA rank (UniPELT's gated LoRA for a bottleneck adapter; 0 when it has none)."""
    if adapter_family(config) == "BOTTLENECK":
        return int(getattr(config, "lora_r", 0) or 0)
    return max([int(config.r), *(int(v) for v in (getattr(config, "rank_pattern", None) or {}).values())])


def check_adapter(path: str | Path, max_rank: int) -> Any:
    """The adapter's config, or `AdapterError`. A LoRA adapter is refused for what vLLM would refuse
    too, so a LoRA adapter that serves here also serves in production; a bottleneck adapter serves
    here only (vLLM serves LoRA only), which `tunepipe export` says when it refuses it for vLLM."""
    from peft import PeftConfig

    from tunepipe.tasks.lm import bottleneck  # lazy: pulls in torch

    bottleneck.register()
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = PeftConfig.from_pretrained(str(path))
        kind = adapter_family(config)
        rank = adapter_rank(config)  # e.g. `"r": "eight"` fails here, not at load
    except (ValueError, json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise AdapterError(f"{path}: unreadable adapter_config.json: {_first_line(exc)}") from None
    if kind == "BOTTLENECK":
        return config
    if kind != "LORA":
        raise AdapterError(
            f"{path}: a {kind} adapter; multi-adapter serving takes LoRA adapters (here and in vLLM) and tunepipe's "
            "bottleneck adapters (adapter, adapter_drop, mam_adapter, unipelt, adapter_fusion; here only)"
        )
    if getattr(config, "use_dora", False):
        raise AdapterError(f"{path}: a DoRA adapter; vLLM does not serve DoRA: merge it (export) or train plain LoRA")
    if getattr(config, "modules_to_save", None):
        raise AdapterError(f"{path}: has modules_to_save {config.modules_to_save}; vLLM does not serve those: merge it instead")
    if rank > max_rank:
        raise AdapterError(f"{path}: rank {rank} exceeds the server's max_lora_rank {max_rank}: raise --max-lora-rank")
    return config


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


class MultiLoraEngine:
    """The model side of the embedded server. Not thread-safe: call from one thread (the batcher's)."""

    def __init__(
        self, base: str, *, dtype: str = "float32", attn_implementation: str | None = None, max_rank: int = 64, device: str = "cpu"
    ):
        import torch

        self.base = base
        self.max_rank = max_rank
        self.tokenizer = load_tokenizer(base)
        self._load = lambda: load_model(base, dtype=dtype, attn_implementation=attn_implementation, device_map={"": device}).eval()
        self.model = self._load()  # the plain base until the first adapter wraps it
        self.models: dict[str, Any] = {}  # adapter family (peft type) -> its PeftModel
        self.device = self.model.device
        self.adapters: dict[str, str] = {}  # served name -> adapter directory
        self.ranks: dict[str, int] = {}
        self.slots: dict[str, str] = {}  # served name -> the peft adapter holding its weights
        self.slot_shapes: dict[str, str] = {}  # peft adapter -> slot_shape of what it holds
        self.slot_family: dict[str, str] = {}  # peft adapter -> the family whose PeftModel holds it
        self.free_slots: list[str] = []  # unloaded peft adapters kept for reuse, oldest first
        self._slot_ids = itertools.count()
        self._torch = torch
        self._lock = threading.Lock()  # guards model mutation against a stray second caller
        # generation_config's eos list, the tokenizer's eos and the chat template's end-of-turn token
        self.eos_ids = set(stop_token_ids(self.tokenizer, self.model.generation_config))
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self._grammars = None

    @property
    def grammars(self):
        """The engine's grammar compiler (built on first use: response_format requests only)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, int(self.model.config.vocab_size), self.eos_ids)
        return self._grammars

    # ---------------------------------------------------------------- adapters

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Serve the adapter at `path` as `name`: into a free slot of the same shape if an unload
        left one (a weight copy), else into a new slot (peft injects LoRA layers into the model)."""
        config = check_adapter(path, self.max_rank)
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"the LoRA adapter {name!r} is already loaded (from {self.adapters[name]})")
            shape = slot_shape(config)
            slot = next((free for free in self.free_slots if self.slot_shapes[free] == shape), None)
            try:
                if slot is not None:
                    self._fill_slot(slot, path)
                    self.free_slots.remove(slot)
                else:
                    slot = self._new_slot(path, shape, adapter_family(config))
            except (RuntimeError, ValueError, KeyError, OSError) as exc:  # shape mismatch: another base's adapter
                raise AdapterError(f"{path}: does not fit base {self.base}: {_first_line(exc)}") from None
            except Exception as exc:  # noqa: BLE001 - e.g. safetensors' error on a truncated file: the adapter's fault
                raise AdapterError(f"{path}: unreadable adapter weights ({type(exc).__name__}: {_first_line(exc)})") from None
            self.adapters[name] = str(path)
            self.ranks[name] = adapter_rank(config)
            self.slots[name] = slot

    def unload_adapter(self, name: str) -> None:
        """Stop serving `name`. Its slot stays in the model, free for the next adapter of the same
        shape (a deploy replaces a version by one of the same shape); beyond MAX_FREE_SLOTS the
        oldest free slot is deleted."""
        with self._lock:
            if name not in self.adapters:
                raise KeyError(name)
            self.free_slots.append(self.slots.pop(name))
            del self.adapters[name]
            del self.ranks[name]
            while len(self.free_slots) > MAX_FREE_SLOTS:
                oldest = self.free_slots.pop(0)
                self.models[self.slot_family.pop(oldest)].delete_adapter(oldest)
                del self.slot_shapes[oldest]

    def _new_slot(self, path: str | Path, shape: str, family: str) -> str:
        from peft import PeftModel

        slot = f"slot-{next(self._slot_ids)}"
        if family in self.models:
            self.models[family].load_adapter(str(path), adapter_name=slot)
        else:
            # The first family wraps the loaded base; a later one gets its own copy (peft injects
            # its layers into the modules it wraps, and one PeftModel holds one adapter type).
            base = self._load() if self.models else self.model
            self.models[family] = PeftModel.from_pretrained(base, str(path), adapter_name=slot).eval()
            if len(self.models) == 1:
                self.model = self.models[family]
        self.slot_shapes[slot] = shape
        self.slot_family[slot] = family
        return slot

    def _fill_slot(self, slot: str, path: str | Path) -> None:
        """Copy an adapter's weights into an existing slot of the same shape: every LoRA tensor of
        the slot is overwritten, so nothing of its previous adapter remains."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        weights = load_peft_weights(str(path), device=str(self.device))
        result = set_peft_model_state_dict(self.models[self.slot_family[slot]], weights, adapter_name=slot)
        missing = [key for key in result.missing_keys if f".{slot}." in key]
        if missing or result.unexpected_keys:
            raise ValueError(f"its weights do not fill a slot of its own shape ({len(missing)} missing, "
                             f"{len(result.unexpected_keys)} unexpected, e.g. {(missing or result.unexpected_keys)[0]})")

    # ---------------------------------------------------------------- prompts

    def completion_ids(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError(f"the model {self.base} has no chat template: use /v1/completions")
        # Rendered and tokenized exactly as the training stages render a prompt (the template owns BOS).
        try:
            if tools:
                text = render_with_tools(self.tokenizer, messages, tools)
            else:
                text = render_messages(self.tokenizer, self.tokenizer.chat_template, messages, True)
        except TemplateRefused as exc:  # e.g. a system message to Gemma: the client's error (400), not ours
            raise ValueError(str(exc)) from None
        return list(encode_text(self.tokenizer, text)["input_ids"])

    # ---------------------------------------------------------------- generation

    def generate(self, rows: list[Row]) -> None:
        """Generate every row; rows finish (and emit) independently. Rows of one adapter family (and
        the base model's rows, with the first family) share one `generate` call. A failure ends the
        call's unfinished rows with an ("error", message) event and is re-raised."""
        with self._lock:
            rows = self._servable(rows)
            if not rows:
                return
            for group, model, peft in self._generation_groups(rows):
                self._generate(group, model, peft=peft)

    def _generation_groups(self, rows: list[Row]) -> list[tuple[list[Row], Any, bool]]:
        """(rows, model, peft?) per generate call. One PeftModel holds one PEFT type, so rows go to
        the model of their adapter's family (base rows to the first). Within a family the rows are
        one mixed-adapter batch, unless an adapter cannot take part in one: LoRA on parameters
        (`target_parameters`, a Mixture-of-Experts model's fused experts) has no per-row adapter
        selection in peft, so those rows run one adapter at a time."""
        families: dict[str | None, list[Row]] = {}
        first = next(iter(self.models), None)
        for row in rows:
            family = self.slot_family[self.slots[row.adapter]] if row.adapter else first
            families.setdefault(family, []).append(row)
        out = []
        for family, group in families.items():
            model = self.models[family] if family else self.model
            if family is None or not _uniform_only(model):
                out.append((group, model, family is not None))
                continue
            by_adapter: dict[str | None, list[Row]] = {}
            for row in group:
                by_adapter.setdefault(row.adapter, []).append(row)
            out.extend((rows_of_one, model, True) for rows_of_one in by_adapter.values())
        return out

    def _generate(self, rows: list[Row], model: Any, peft: bool) -> None:
        input_ids, attention_mask, pad = self._left_padded(rows)
        kwargs: dict[str, Any] = {}
        adapter_context: Any = contextlib.nullcontext()
        if peft:
            names = [self.slots[r.adapter] if r.adapter else BASE_ADAPTER for r in rows]
            if not _uniform_only(model):
                kwargs["adapter_names"] = names
            elif names[0] == BASE_ADAPTER:
                adapter_context = model.disable_adapter()
            else:
                model.set_adapter(names[0])
        tracker = RowTracker(rows, self.tokenizer, self.eos_ids)
        hook = None
        try:  # everything that can fail is inside: a row that never hears back would hold its request's slot
            if rows[0].sampling.seed is not None:
                self._torch.manual_seed(rows[0].sampling.seed)
            with self._torch.inference_mode(), adapter_context:
                for index, row in enumerate(rows):
                    if row.echo:
                        names = kwargs.get("adapter_names")
                        row.prompt_logprobs = self._prompt_logprobs(model, row, {"adapter_names": [names[index]]} if names else {})
                if any(row.logprobs is not None or row.grammar is not None for row in rows):
                    # each step's raw next-token logits (log-probabilities are reported from these), then the
                    # grammar's mask, before generate's temperature/top_p see them
                    target = model.get_base_model() if hasattr(model, "get_base_model") else model
                    hook = target.register_forward_hook(lambda module, args, output: tracker.see(output.logits[:, -1], self.grammars))
                model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(r.max_tokens for r in rows),
                    pad_token_id=pad, stopping_criteria=[tracker], **rows[0].sampling.generate_kwargs(), **kwargs,
                )
        except Exception as exc:
            fail_rows(rows, f"generation failed: {exc}")
            raise
        finally:
            if hook is not None:
                hook.remove()
        tracker.close()

    def _prompt_logprobs(self, model: Any, row: Row, kwargs: dict[str, Any]) -> list[tuple[int, float | None, list]]:
        """Each prompt token's log-probability given the tokens before it (the first has none), with the row's
        adapter: what completions' `echo` + `logprobs` answer, and what lm-eval's loglikelihood reads."""
        torch = self._torch
        ids = torch.tensor([row.prompt_ids], device=self.device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out: list[tuple[int, float | None, list]] = [(row.prompt_ids[0], None, [])]
        for position, token in enumerate(row.prompt_ids[1:]):
            out.append((token, logprobs[position, token].item(), top_alternatives(logprobs[position], row.logprobs or 0)))
        return out

    def _servable(self, rows: list[Row]) -> list[Row]:
        """Drop cancelled rows, and fail rows whose adapter was unloaded after they were accepted."""
        kept = []
        for row in rows:
            if row.cancelled:
                continue
            if row.adapter is not None and row.adapter not in self.adapters:
                row.finish_reason = "error"
                row.emit(("error", f"the LoRA adapter {row.adapter!r} was unloaded"))
                continue
            kept.append(row)
        return kept

    def _left_padded(self, rows: list[Row]):
        # Left padding: every row's next token lands in the same (last) column.
        torch = self._torch
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device)
        return input_ids, attention_mask, pad


def top_alternatives(logprobs, k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens and their log-probabilities, best first."""
    if k <= 0:
        return []
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


def fail_rows(rows: list[Row], message: str) -> None:
    """End every unfinished row with an ("error", message) event."""
    for row in rows:
        if not row.finished:
            row.finish_reason = "error"
            row.emit(("error", message))


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not yet safe to send: a possible start of a stop string, or
    an incomplete UTF-8 character (the byte-level decoder shows its bytes as U+FFFD until it completes)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return max(hold, len(text) - len(text.rstrip("\ufffd")))


def _finished_text(text: str) -> str:
    """A finished answer without the U+FFFD of a character its last tokens left incomplete (max_tokens cut it):
    vLLM's detokenizer never emits those bytes either, so both engines answer the same text."""
    return text.rstrip("\ufffd")


class RowTracker(StoppingCriteria):
    """Called by `generate` after each step: takes each row's new token, applies its own eos/stop/
    max_tokens, emits its new text, and reports which rows are done."""

    def __init__(self, rows: list[Row], tokenizer: Any, eos_ids: set[int]):
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.logits = None  # the last forward's next-token logits (set only when a row wants log-probabilities)

    def see(self, logits, grammars: Any = None) -> None:
        constrained = [i for i, row in enumerate(self.rows) if row.grammar is not None and not row.finished]
        # log-probabilities are reported from the logits before the mask: keep a copy only when one is asked for
        wanted = constrained and any(row.logprobs is not None for row in self.rows)
        self.logits = logits.clone() if wanted else logits
        for index in constrained:
            grammars.mask(logits[index], self.rows[index].grammar)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        for index, (row, token) in enumerate(zip(self.rows, last)):
            if not row.finished:
                self._step(row, token, index)
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)

    def _step(self, row: Row, token: int, index: int = 0) -> None:
        if row.cancelled:
            row.finish_reason = "cancelled"
            return
        if row.grammar is not None and not row.grammar.is_terminated():
            row.grammar.accept_token(token)
        if row.logprobs is not None and self.logits is not None:
            import torch

            logprobs = torch.log_softmax(self.logits[index].float(), dim=-1)
            row.token_logprobs.append((token, logprobs[token].item(), top_alternatives(logprobs, row.logprobs)))
        row.generated += 1
        if token in self.eos_ids:
            row.finish_reason = "stop"
        else:
            row.tokens.append(token)
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=row.skip_special_tokens)
            cut = min((i for i in (row.text.find(s) for s in row.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]  # OpenAI semantics: the stop string is not returned
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.finish_reason = "length"
        if row.finished:
            row.text = _finished_text(row.text)
        end = len(row.text) if row.finished else len(row.text) - _held_back(row.text, row.stop)
        if end > row.sent:
            row.emit(("delta", row.text[row.sent:end]))
            row.sent = end
        if row.finished:
            row.emit(("done", row.finish_reason, row.generated))

    def close(self) -> None:
        """Rows generate left unfinished (it stops at the batch's largest max_tokens) end here."""
        for row in self.rows:
            if not row.finished:
                row.finish_reason = "length"
                row.text = _finished_text(row.text)
                if len(row.text) > row.sent:
                    row.emit(("delta", row.text[row.sent:]))
                    row.sent = len(row.text)
                row.emit(("done", row.finish_reason, row.generated))


def _uniform_only(model: Any) -> bool:
    """True when an adapter of this PeftModel rules out mixed-adapter batches (see
    `_generation_groups`)."""
    return any(getattr(c, "target_parameters", None) for c in getattr(model, "peft_config", {}).values())
