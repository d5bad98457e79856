"""What is compared, and how its answers are generated.

A *source* is the candidate or the baseline: a model artifact (`outputs.json` of sft/align), a
bare adapter or model directory, or the base model itself (adapters disabled). Per task it names
one *spec*: a full model, or a base model plus an adapter (per-task adapters: the task's own).

Answers are greedy. `HFGenerator` loads each base model once, puts every adapter on it under
its own name, and switches between them (the base is the same weights with adapters disabled);
it is also what lm-eval runs on. `EndpointGenerator` sends the same rendered prompts to an
OpenAI-compatible completions endpoint (vLLM), so both paths answer the same text.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.evaluate import EvaluateConfig, GenerationEndpoint
from tunepipe.schemas.handoffs import AlignKeyedConfig, ModelOutputs, SFTKeyedConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.handoff import read_handoff, read_manifest_config
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import final_answer, read_split, reasoning_end
from tunepipe.tasks.lm.generation import greedy_answers
from tunepipe.tasks.lm.judge import openai_client


@dataclass(frozen=True)
class ModelSpec:
    """One model to generate with: `model` is a full model, or the base under `adapter`."""

    label: str
    model: str
    adapter: str | None = None
    tokenizer: str = ""
    served_name: str | None = None  # the endpoint's model name (backend: endpoint)


@dataclass
class ModelSource:
    """The candidate or the baseline, across tasks."""

    name: str
    kind: str  # adapter | adapters | model | base
    base_model: str
    root: Path | None = None
    paths: dict[str, str] = field(default_factory=dict)
    trained_tasks: list[str] | None = None  # None: unknown (a bare directory)
    system_prompt: str | None = None

    def spec(self, task: str) -> ModelSpec:
        if self.kind == "base":
            return ModelSpec(self.name, self.base_model, None, self.base_model)
        if self.kind == "adapters":
            if task not in self.paths:
                raise StageFailed(
                    f"evaluate: {self.name} has per-task adapters for {sorted(self.paths)} but none for task {task!r}: "
                    "set evaluate.tasks to those tasks"
                )
            directory = str(self.root / self.paths[task])
            return ModelSpec(f"{self.name}:{task}", self.base_model, directory, directory)
        directory = str(self.root / next(iter(self.paths.values()))) if self.paths else str(self.root)
        if self.kind == "model":
            return ModelSpec(self.name, directory, None, directory)
        return ModelSpec(self.name, self.base_model, directory, directory)


# --------------------------------------------------------------------------------------------
# Resolving the candidate and the baseline


def artifact_source(name: str, ref: ArtifactRef | Path | str, base_override: str | None, fallback_base: str | None) -> ModelSource:
    """A model artifact (sft, align): its outputs.json, and its manifest's config (the tasks it was trained on,
    the system prompt it was trained with)."""
    root = Path(ref.path if isinstance(ref, ArtifactRef) else ref)
    outputs = read_handoff(root, ModelOutputs, reader=f"evaluate: {name}")
    config = read_manifest_config(root, (SFTKeyedConfig, AlignKeyedConfig), reader=f"evaluate: {name}")
    return ModelSource(
        name=name,
        kind=outputs.kind,
        base_model=_base_model(base_override, outputs.base_model, fallback_base, name),
        root=root,
        paths=dict(outputs.paths),
        trained_tasks=config.tasks,
        system_prompt=config.system_prompt,
    )


def path_source(path: str, base_override: str | None, fallback_base: str | None) -> ModelSource:
    """An explicit path: a model artifact, a PEFT adapter directory or a full model directory."""
    root = Path(path)
    if (root / ModelOutputs.FILE).exists():
        return artifact_source(str(root), root, base_override, fallback_base)
    if (root / "adapter_config.json").exists():
        declared = json.loads((root / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return ModelSource(str(root), "adapter", _base_model(base_override, declared, fallback_base, str(root)), root)
    if (root / "config.json").exists():
        return ModelSource(str(root), "model", str(root), root)
    from tunepipe.tasks.lm.modeling import gguf_source, model_dir

    if gguf_source(root) is not None:
        converted = model_dir(root)
        return ModelSource(str(root), "model", converted, Path(converted))
    raise StageFailed(f"evaluate: {path}: neither a model artifact (outputs.json), an adapter (adapter_config.json) nor a model (config.json)")


def base_source(candidate: ModelSource) -> ModelSource:
    """The candidate's base model: the same weights with no adapter."""
    return ModelSource("base", "base", candidate.base_model)


def resolve_candidate(config: EvaluateConfig, inputs: dict[str, ArtifactRef]) -> ModelSource:
    choice = config.candidate
    if choice == "auto":
        choice = "align" if "align" in inputs else "sft"
    fallback = _upstream_base(inputs)
    if choice in ("align", "sft"):
        if choice not in inputs:
            raise StageFailed(f"evaluate: candidate {choice}, but the stage has no `{choice}` input: run the {choice} stage first")
        return artifact_source(choice, inputs[choice], config.base_model, fallback)
    return path_source(choice, config.base_model, fallback)


def resolve_baseline(config: EvaluateConfig, inputs: dict[str, ArtifactRef], candidate: ModelSource) -> ModelSource:
    """The baseline. One place per source: `auto` picks sft for an aligned candidate, else the base."""
    choice = config.baseline
    if choice == "auto":
        choice = "sft" if candidate.name == "align" else "base"
    if choice == "base":
        return base_source(candidate)
    if choice == "sft":
        if "sft" not in inputs:
            raise StageFailed("evaluate: baseline sft, but the stage has no `sft` input")
        return artifact_source("sft", inputs["sft"], config.base_model, candidate.base_model)
    if choice == "serving":
        return serving_source(config, candidate) or base_source(candidate)
    return path_source(choice, config.base_model, candidate.base_model)


def serving_names(config: EvaluateConfig, candidate: ModelSource) -> dict[str, str]:
    """Registry name per run of the candidate: deploy registers per-task adapters as `<name>-<task>`."""
    if candidate.kind == "adapters":
        return {task: f"{config.registry_name}-{task}" for task in candidate.paths}
    return {"all": str(config.registry_name)}


def serving_versions(config: EvaluateConfig, candidate: ModelSource) -> dict[str, Any]:
    """{run: the registry version serving it}, for the runs that have one."""
    from tunepipe.tasks.core.registry import AdapterRegistry

    registry = AdapterRegistry(str(config.registry))
    serving = registry.serving(config.registry_alias)
    return {run: serving[name] for run, name in serving_names(config, candidate).items() if name in serving}


def serving_source(config: EvaluateConfig, candidate: ModelSource) -> ModelSource | None:
    """What serves now, as a source over the candidate's base; None when nothing serves every run
    (the caller then compares with the base model, which is what a first deploy replaces)."""
    from tunepipe.tasks.core.registry import AdapterRegistry

    versions = serving_versions(config, candidate)
    if not versions or len(versions) < len(serving_names(config, candidate)):
        return None
    registry = AdapterRegistry(str(config.registry))
    paths = {run: registry.local_path(entry) for run, entry in versions.items()}
    label = "serving " + ", ".join(f"{e.name}@{e.version}" for e in versions.values())
    if candidate.kind == "adapters":
        return ModelSource(label, "adapters", candidate.base_model, Path("/"), paths, None, candidate.system_prompt)
    return ModelSource(label, "adapter", candidate.base_model, Path(paths["all"]), {}, None, candidate.system_prompt)


def trained_tasks(source: ModelSource, data_dir: str) -> list[str]:
    """The tasks a source was trained on: its config's `tasks`, else every task of the train split."""
    if source.kind == "adapters":
        return sorted(source.paths)
    if source.trained_tasks:
        return list(source.trained_tasks)
    return sorted({str(r.get("task") or "default") for r in read_split(data_dir, "train")})


def _upstream_base(inputs: dict[str, ArtifactRef]) -> str | None:
    for name in ("pretrain", "base_model"):
        if name in inputs:
            return inputs[name].path
    return None


def _base_model(override: str | None, declared: str | None, fallback: str | None, name: str) -> str:
    """The base under the adapters: the config's, else the artifact's own (if it is still there), else upstream."""
    from tunepipe.schemas.base import looks_like_hub_id

    from tunepipe.tasks.lm.modeling import model_dir

    for candidate in (override, declared, fallback):
        if candidate and (Path(candidate).exists() or looks_like_hub_id(candidate)):
            return model_dir(candidate)
    raise StageFailed(
        f"evaluate: {name}: its base model {declared!r} is not here: set evaluate.base_model, or give the stage the "
        "`pretrain` or `base_model` input it was trained from"
    )


# --------------------------------------------------------------------------------------------
# Generation


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
        from tunepipe.tasks.lm.modeling import load_tokenizer

        if spec.tokenizer not in self._tokenizers:
            self._tokenizers[spec.tokenizer] = load_tokenizer(spec.tokenizer)
        return self._tokenizers[spec.tokenizer]

    def _load(self, path: str) -> Any:
        from tunepipe.tasks.training.hardware import hardware
        from tunepipe.tasks.lm.modeling import load_model

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
            from tunepipe.tasks.lm.modeling import load_tokenizer

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

        from urllib.parse import urlencode

        from tunepipe.tasks.core.secrets import url_parts

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


def served_spec(spec: ModelSpec, template: str, task: str) -> ModelSpec:
    """The spec with its model name on the endpoint (`{task}` filled in)."""
    return ModelSpec(spec.label, spec.model, spec.adapter, spec.tokenizer, template.replace("{task}", task))
