"""What is compared: the candidate and the baseline, resolved to the models that answer.

A *source* is the candidate or the baseline: a model artifact (`outputs.json` of sft/align), a
bare adapter or model directory, the base model itself (adapters disabled), or what the registry
serves now. Per task it names one *spec*: a full model, or a base model plus an adapter
(per-task adapters: the task's own). How a spec answers is `backends.py`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunepipe.schemas.base import looks_like_hub_id
from tunepipe.schemas.evaluate import EvaluateConfig
from tunepipe.schemas.handoffs import AlignKeyedConfig, ModelOutputs, SFTKeyedConfig
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.tasks.core.handoff import read_handoff, read_manifest_config
from tunepipe.tasks.core.registry import AdapterRegistry
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.encoding import read_split
from tunepipe.tasks.lm.modeling import gguf_source, model_dir


@dataclass(frozen=True)
class ModelSpec:
    """One model to generate with: `model` is a full model, or the base under `adapter`."""

    label: str
    model: str
    adapter: str | None = None
    tokenizer: str = ""
    served_name: str | None = None  # the endpoint's model name (backend: endpoint)

    def served(self, template: str, task: str) -> "ModelSpec":
        """This spec under its model name on the endpoint (`{task}` filled in)."""
        return ModelSpec(self.label, self.model, self.adapter, self.tokenizer, template.replace("{task}", task))


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
    registry = AdapterRegistry(str(config.registry))
    serving = registry.serving(config.registry_alias)
    return {run: serving[name] for run, name in serving_names(config, candidate).items() if name in serving}


def serving_source(config: EvaluateConfig, candidate: ModelSource) -> ModelSource | None:
    """What serves now, as a source over the candidate's base; None when nothing serves every run
    (the caller then compares with the base model, which is what a first deploy replaces)."""
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
    for candidate in (override, declared, fallback):
        if candidate and (Path(candidate).exists() or looks_like_hub_id(candidate)):
            return model_dir(candidate)
    raise StageFailed(
        f"evaluate: {name}: its base model {declared!r} is not here: set evaluate.base_model, or give the stage the "
        "`pretrain` or `base_model` input it was trained from"
    )
