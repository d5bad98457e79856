"""How a model spec answers: the generation backends (`evaluate.generation.backend`).

Answers are greedy. `HFGenerator` (`hf`) loads each base model once, puts every adapter on it
under its own name, and switches between them (the base is the same weights with adapters
disabled); it is also what lm-eval runs on. `EndpointGenerator` (`endpoint`) sends the same
rendered prompts to an OpenAI-compatible completions endpoint (vLLM), so both paths answer the
same text. What is compared (the candidate and the baseline, as specs) is `sources.py`'s.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator
from urllib.parse import urlencode

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.evaluate import GenerationEndpoint
from tunepipe.tasks.core.secrets import url_parts
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.evaluate.sources import ModelSpec
from tunepipe.tasks.lm.encoding import final_answer, reasoning_end
from tunepipe.tasks.lm.generation import greedy_answers
from tunepipe.tasks.lm.judge import openai_client
from tunepipe.tasks.lm.modeling import load_model, load_tokenizer
from tunepipe.tasks.training.hardware import hardware


class HFGenerator:
    """Batched greedy generation with transformers (+ PEFT), on the profile's device and dtype."""

    def __init__(self, env: EnvironmentProfile, *, max_new_tokens: int, batch_size: int):
        self.env = env
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self._models: dict[str, Any] = {}  # base or full model path → model (PeftModel once it has adapters)
        self._adapters: dict[str, str] = {}  # adapter dir → its name on the model
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, spec: ModelSpec) -> Any:
        if spec.tokenizer not in self._tokenizers:
            self._tokenizers[spec.tokenizer] = load_tokenizer(spec.tokenizer)
        return self._tokenizers[spec.tokenizer]

    def _load(self, path: str) -> Any:
        if path not in self._models:
            hw = hardware(self.env)
            model = load_model(path, dtype=hw.dtype, attn_implementation=hw.attention(padding_free=False))
            model.config.use_cache = True
            self._models[path] = model.to(hw.device).eval()
        return self._models[path]

    @contextlib.contextmanager
    def active(self, spec: ModelSpec) -> Iterator[Any]:
        """The model with exactly this spec's adapter on (or none: adapters disabled)."""
        from peft import PeftModel

        model = self._load(spec.model)
        if spec.adapter is None:
            if isinstance(model, PeftModel):
                with model.disable_adapter():
                    yield model
            else:
                yield model
            return
        if spec.adapter not in self._adapters:
            name = f"adapter{len(self._adapters)}"
            if isinstance(model, PeftModel):
                model.load_adapter(spec.adapter, adapter_name=name)
            else:
                model = self._models[spec.model] = PeftModel.from_pretrained(model, spec.adapter, adapter_name=name).eval()
            self._adapters[spec.adapter] = name
        model.set_adapter(self._adapters[spec.adapter])
        yield model

    def answers(self, spec: ModelSpec, prompts: list[str]) -> list[str]:
        with self.active(spec) as model:
            return greedy_answers(model, self.tokenizer(spec), prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)


class EndpointGenerator:
    """Greedy completions of the rendered prompts from an OpenAI-compatible server (vLLM)."""

    def __init__(self, endpoint: GenerationEndpoint, *, max_new_tokens: int, batch_size: int):
        self.endpoint = endpoint
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.client = openai_client(endpoint)  # tasks/lm/judge.py
        self._think_ends: dict[str, str | None] = {}

    def think_end(self, spec: ModelSpec) -> str | None:
        """The reasoning marker of the spec's tokenizer: a server returns a reasoning family's think block
        in the completion text, and the answer is what follows it (as greedy_answers reads it)."""
        if not spec.tokenizer:
            return None
        if spec.tokenizer not in self._think_ends:
            self._think_ends[spec.tokenizer] = reasoning_end(load_tokenizer(spec.tokenizer))
        return self._think_ends[spec.tokenizer]

    def answers(self, spec: ModelSpec, prompts: list[str]) -> list[str]:
        end = self.think_end(spec)
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            response = self.client.completions.create(**completion_request(spec.served_name, batch, self.max_new_tokens))
            texts = {choice.index: choice.text for choice in response.choices}
            if sorted(texts) != list(range(len(batch))):
                raise StageFailed(f"evaluate: {self.endpoint.url} answered {len(texts)} completions for {len(batch)} prompts")
            out.extend(final_answer(texts[i], end) for i in range(len(batch)))
        return out

    @contextlib.contextmanager
    def active(self, spec: ModelSpec) -> Iterator[ModelSpec]:
        """Nothing to switch: the server holds every model; lm-eval talks to it (see lm_eval_model)."""
        yield spec

    def tokenizer(self, spec: ModelSpec) -> str:
        return spec.tokenizer

    def lm_eval_model(self, spec: ModelSpec, batch_size: int) -> Any:
        """lm-eval's OpenAI-compatible completions backend on the served model. Prompts travel as token ids from
        the spec's own tokenizer (no special tokens added: the rendered prompt holds them), as the HF path reads them."""
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        key = os.environ.get(self.endpoint.api_key_env) if self.endpoint.api_key_env else None
        base, query = url_parts(self.endpoint.url, "evaluate: url")
        return LocalCompletionsAPI(
            model=spec.served_name, base_url=f"{base}/completions" + (f"?{urlencode(query)}" if query else ""), tokenizer_backend="huggingface",
            tokenizer=spec.tokenizer, tokenized_requests=True, add_bos_token=False, batch_size=batch_size,
            num_concurrent=1, max_retries=self.endpoint.max_retries + 1, timeout=int(self.endpoint.timeout_s),
            max_gen_toks=self.max_new_tokens, **({"auth_token": key} if key else {}),
        )


def completion_request(model: str | None, prompts: list[str], max_new_tokens: int) -> dict[str, Any]:
    """The /v1/completions payload: greedy, and (a vLLM extension) no special tokens added, because
    the rendered prompt already holds them, exactly as the HF path tokenizes it."""
    return {
        "model": model,
        "prompt": prompts,
        "max_tokens": max_new_tokens,
        "temperature": 0.0,
        "extra_body": {"add_special_tokens": False, "skip_special_tokens": True},
    }
