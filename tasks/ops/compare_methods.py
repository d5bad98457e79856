"""`tunepipe compare-methods`: the seeds' §6 comparison of fine-tuning methods, measured on the
pipeline's own data instead of quoted from papers.

Every chosen method trains the pipeline's `sft` stage on the same data, base model, budget
(`max_steps`) and seed, one shared adapter (or model) over all tasks; the stages upstream of sft
(data, base_model, pretrain) run once and are cached like in a pipeline run, and so is each
method's sft artifact (a rerun re-measures only latency). Each method trains in a fresh process,
so its peak memory is its own. Per method:

    trainable / %      PEFT's count (the sft stage's metrics)
    peak memory        the training process's peak (CUDA allocated on a GPU, peak RSS on CPU,
                       which includes the ~0.5-1 GB of the Python/torch process itself)
    planned memory     `tunepipe plan`'s estimate for the profile
    step time          training seconds / optimizer steps
    held-out           exact match and token F1 per task on the test split (the sft stage's check)
    latency added      greedy decoding time per token with the result vs the plain base, same
                       prompts, in this process (median of `repeats`)
    vLLM               whether vLLM can serve the result (export's own check), or why not
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.graph import STAGE_GRAPH
from tunepipe.schemas.handoffs import ModelOutputs
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.pipeline import PipelineConfig
from tunepipe.schemas.methods import method_shorthand
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import read_manifest
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.graph import get_stage
from tunepipe.tasks.core.handoff import read_handoff
from tunepipe.tasks.core.stage import run_stage
from tunepipe.tasks.export.stage import vllm_problems
from tunepipe.tasks.lm.encoding import read_split, record_messages
from tunepipe.tasks.lm.modeling import load_model, load_tokenizer
from tunepipe.tasks.sft.stage import SFTStage

UPSTREAM = ("data", "base_model", "pretrain")


def method_label(spec: dict[str, Any]) -> str:
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return spec["name"] + (f"({extra})" if extra else "")


def upstream_refs(config: PipelineConfig, env: Any) -> dict[str, Any]:
    """The data / base_model / pretrain artifacts the sft stage reads (run or taken from the cache)."""
    from tunepipe.tasks.core.prefect_stage import artifact_store  # lazy: pulls in prefect

    refs: dict[str, Any] = {}
    for name in UPSTREAM:
        if getattr(config, name, None) is None:
            continue
        inputs = {source: refs[source] for source in STAGE_GRAPH[name].inputs if source in refs}
        refs[name] = run_stage(get_stage(name), getattr(config, name), inputs, artifact_store(config.workdir), env)
    return refs


def sft_variant(config: PipelineConfig, spec: dict[str, Any], max_steps: int | None, heldout_examples: int | None) -> SFTConfig:
    """The pipeline's sft section with `spec` as its method: one shared run, the given budget."""
    base = config.sft
    training = base.training.model_copy(update={"max_steps": max_steps}) if max_steps else base.training
    heldout = base.heldout.model_copy(update={"max_examples_per_task": heldout_examples}) if heldout_examples is not None else base.heldout
    data = {**base.model_dump(mode="json", exclude={"method", "training", "heldout", "adapters"}), "adapters": "shared",
            "method": spec, "training": training.model_dump(mode="json"), "heldout": heldout.model_dump(mode="json")}
    return SFTConfig.model_validate(data)


def _train_in_child(args: tuple) -> str:
    """Runs in a fresh (spawned) process: the sft stage for one method; returns the artifact path."""
    config_json, sft_json, refs_json, env_json = args
    from tunepipe.tasks.core.prefect_stage import artifact_store  # lazy: pulls in prefect

    workdir = json.loads(config_json)["workdir"]
    refs = {name: ArtifactRef.model_validate(ref) for name, ref in json.loads(refs_json).items()}
    sft = SFTConfig.model_validate_json(sft_json)
    env = EnvironmentProfile.model_validate_json(env_json)
    return run_stage(SFTStage(), sft, refs, artifact_store(workdir), env).path


def train_method(config: PipelineConfig, sft: SFTConfig, refs: dict[str, Any], env: Any) -> Path:
    payload = (json.dumps({"workdir": str(config.workdir)}), sft.model_dump_json(),
               json.dumps({k: v.model_dump(mode="json") for k, v in refs.items()}), env.model_dump_json())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return Path(pool.apply(_train_in_child, (payload,)))


def vllm_verdict(artifact: Path) -> str:
    """"yes", or export's reason why vLLM cannot serve the result."""
    outputs = read_handoff(artifact, ModelOutputs, reader="compare-methods")
    if outputs.kind == "model":
        return "yes (full weights)"
    cfg = json.loads((artifact / outputs.paths["all"] / "adapter_config.json").read_text())
    problems = vllm_problems("all", cfg, max_rank=512)
    return "yes" if not problems else "no: " + problems[0].split(": ", 1)[1].split(": vLLM")[0]


def decode_seconds_per_token(model: Any, prompts: list[list[int]], new_tokens: int, repeats: int) -> float:
    """Median over `repeats` of the time to greedily decode `new_tokens` for each prompt, per token."""
    import torch

    with torch.inference_mode():  # warm-up: first-call allocations and kernel selection are not latency
        model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for ids in prompts:
                model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        times.append((time.perf_counter() - started) / (new_tokens * len(prompts)))
    return statistics.median(times)


def latency(artifact: Path, outputs: ModelOutputs, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, float]:
    base_model = outputs.base_model
    base = load_model(base_model).eval()
    if outputs.kind == "model":
        tuned = load_model(str(artifact / outputs.paths["all"])).eval()
    else:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(load_model(base_model), str(artifact / outputs.paths["all"])).eval()
    # Alternating base and tuned rounds, so a machine's load drift hits both alike.
    base_runs, tuned_runs = [], []
    for _ in range(repeats):
        base_runs.append(decode_seconds_per_token(base, prompts, new_tokens, 1))
        tuned_runs.append(decode_seconds_per_token(tuned, prompts, new_tokens, 1))
    base_s, tuned_s = statistics.median(base_runs), statistics.median(tuned_runs)
    return {"base_ms_per_token": round(1000 * base_s, 3), "ms_per_token": round(1000 * tuned_s, 3),
            "latency_added_percent": round(100 * (tuned_s - base_s) / base_s, 1)}


def test_prompts(data_dir: str, tokenizer_dir: Path, count: int) -> list[list[int]]:
    """The first `count` test prompts, rendered with the trained tokenizer's chat template."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompts = []
    for record in read_split(data_dir, "test")[:count]:
        messages = [m for m in record_messages(record) if m["role"] != "assistant"]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def compare_methods(
    config: PipelineConfig,
    specs: list[Any],
    *,
    max_steps: int | None = None,
    heldout_examples: int | None = None,
    latency_prompts: int = 4,
    latency_tokens: int = 16,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """One row of measured facts per method spec (a name or a `{name: ..., knob: ...}` dict)."""
    if config.sft is None:
        raise ValueError(f"{config.name}: compare-methods needs a pipeline with an sft section (its data, model and training)")
    env = load_environment(config.environment)
    refs = upstream_refs(config, env)
    rows = []
    for raw in specs:
        spec = method_shorthand(raw)
        sft = sft_variant(config, spec, max_steps, heldout_examples)
        artifact = train_method(config, sft, refs, env)
        run = json.loads((artifact / "metrics.json").read_text())["all"]
        metrics = read_manifest(artifact).metrics
        outputs = read_handoff(artifact, ModelOutputs, reader="compare-methods")
        prompts = test_prompts(refs["data"].path, artifact / outputs.paths["all"], latency_prompts)
        rows.append({
            "method": method_label(spec),
            "trainable_parameters": metrics["trainable_parameters"],
            "trainable_percent": metrics["trainable_percent"],
            "peak_memory_gb": run["peak_memory_gb"],
            "peak_memory_kind": run.get("peak_memory_kind"),
            "planned_memory_gb": metrics["planned_memory_gb"],
            "steps": run["global_step"],
            "step_seconds": round(run["train_seconds"] / max(run["global_step"], 1), 4),
            "train_loss": run["train_loss"],
            "heldout": {task: {k: s[k] for k in ("exact_match", "token_f1", "base_exact_match", "base_token_f1", "n")}
                        for task, s in (metrics.get("heldout") or {}).items()},
            **latency(artifact, outputs, prompts, latency_tokens, repeats),
            "vllm": vllm_verdict(artifact),
            "artifact": str(artifact),
        })
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    tasks = sorted({task for row in rows for task in row["heldout"]})
    head = ["method", "trainable", "peak mem GB", "planned GB", "s/step", "train loss"]
    head += [f"{t} EM / F1" for t in tasks] + ["latency added", "vLLM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['method']}`", f"{row['trainable_parameters']:,} ({row['trainable_percent']:.2f}%)",
                 f"{row['peak_memory_gb']:.2f}", f"{row['planned_memory_gb']:.3f}", f"{row['step_seconds']:.3f}", f"{row['train_loss']:.3f}"]
        for task in tasks:
            s = row["heldout"].get(task)
            cells.append(f"{s['exact_match']:.2f} / {s['token_f1']:.2f}" if s else "-")
        cells += [f"{row['latency_added_percent']:+.0f}%", row["vllm"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
