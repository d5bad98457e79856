"""GPU SFT: tunepipe's sft training against configured peers, LoRA and QLoRA, at two sequence lengths
on two model sizes (issue 8 benchmark 6, issue 19). Needs one CUDA GPU; `--smoke` runs the whole
logic on a CPU with a tiny model in seconds (what the test suite runs).

    python benchmarks/gpu_sft.py --out result.json        # the full table: 0.5b + 1.5b, 1k + 4k, lora + qlora
    python benchmarks/gpu_sft.py --smoke                  # every side, tiny model, CPU, in-process

Models: randomly initialised Qwen2 models with the real configs of Qwen2.5-0.5B (494M parameters)
and Qwen2.5-1.5B (1.54B), written out below (no hub), built on the device and saved once;
throughput does not depend on the weights' values. Data: synthetic instruction records whose
answer lengths are log-normal (a long tail, like real instruction sets), tokenised once by a BPE
tokenizer trained on them (tunepipe's base_model code) and rendered by tunepipe's encoding, so
every side trains on the same token ids and labels.

Sides, each in a fresh process (`--smoke`: in this process), same model, rows, steps, seed,
learning rate, optimiser, precision and batch:

- `baseline`: a plain script: `AutoModelForCausalLM.from_pretrained` (QLoRA: 4-bit NF4 +
  `prepare_model_for_kbit_training`), `peft.get_peft_model`, `transformers.Trainer` with
  `DataCollatorForSeq2Seq` (each batch padded to its longest row, full logits in the loss).
- `trl`: TRL's `SFTTrainer` configured as its documentation recommends for speed: `packing=True`
  (best-fit), `padding_free=True`, `use_liger_kernel` (the profile's `liger_kernel`), the best
  attention kernel installed (the profile's `packed_attention` preferences: flash-attn, else
  flex_attention), `peft_config` passed to the trainer.
- `unsloth`: Unsloth's `FastLanguageModel` + its `get_peft_model`, trained by TRL's SFTTrainer with
  packing; reported as unavailable (with the import error) where Unsloth does not install.
- `tunepipe` (rows padded), `liger`, `packing`, `liger+packing`: the sft stage's own training job
  (`tasks.sft.train.train_job`) with the profile's `liger_kernel` and the stage's `packing` as named;
  packed runs load the profile's `packed_attention` kernel.

Tokens per step: `--tokens-per-batch` (16384) / the sequence length rows per micro-batch (16 at
1k, 4 at 4k), accumulation from the profile. Packed sides fill every row (the same tokens per
step on `trl`, `unsloth` and tunepipe's packed runs); padded sides see the same number of rows
but fewer real tokens. `tokens_per_step` is reported for every run.

Figures per run:
- tokens/s: non-padding tokens (the Trainer's `num_input_tokens_seen`) per second between the end
  of optimizer step `--warmup-steps` and the last step, CUDA synchronised at each step end (start-up,
  compilation and saving fall outside the window).
- peak memory: `torch.cuda.max_memory_allocated` (and `max_memory_reserved`) over the whole run.
- planned: the memory planner (`tasks.training.memory_plan.plan`) for that side's setup (loss path
  `nll` for the plain Trainer, TRL's `chunked_nll` or Liger otherwise; packed or padded rows; the
  kernel), and planned / measured.
- MFU = model FLOPs per token x tokens/s / the card's dense bf16 peak. FLOPs per token, recomputation
  not counted: 4 N_matmul (forward 2 N, backward input gradients 2 N) + 6 N_trainable (the trainable
  weights' gradients; the frozen base gets none under LoRA/QLoRA; QLoRA's dequantisation is not
  counted) + 12 x layers x hidden x the token-weighted mean document length (PaLM's attention term,
  each token attending within its own example). `mfu_6n` is the conventional 6 N + attention, which
  over-counts LoRA/QLoRA (it charges weight gradients the frozen base never computes); it is
  reported for comparison with papers that use it.
- `--profile`: a `torch.profiler` table of two steps after warm-up (CUDA/CPU time by op) per run.

Prints one JSON object (and writes it to `--out` after every run).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import header, median, ratio, rounded  # noqa: E402

# Real configs (config.json of the Qwen2.5 releases), written out: no hub on the device.
_QWEN25 = {"model_type": "qwen2", "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768,
           "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "num_key_value_heads": 2}
ARCHS: dict[str, dict[str, Any]] = {
    "0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
    # `--smoke`: the same code path on a CPU in seconds.
    "tiny": {**_QWEN25, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 8000, "max_position_embeddings": 4096},
}
TUNEPIPE_VARIANTS = ("tunepipe", "liger", "packing", "liger+packing")
VARIANTS = ("baseline", "trl", "unsloth", *TUNEPIPE_VARIANTS)
DEFAULT_VARIANTS = ("baseline", "trl", "unsloth", "tunepipe", "liger+packing")
# Dense bf16 peak of the card (spec sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}
# Issue 19's targets.
MFU_TARGET = {"lora": 0.30, "qlora": 0.20}
PLAN_TOLERANCE = 0.15


# --------------------------------------------------------------------------------------------
# Inputs: data, tokenizer, model


def synthetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """Instruction records: 6-40 word instructions, answers log-normal around 90 words (5-700)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "do", "pri", "an", "ço", "zu", "ber", "ith", "og", "nar"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(20000)})
    records = []
    for i in range(n):
        instruction = " ".join(rng.choice(words) for _ in range(rng.randint(6, 40)))
        answer_words = int(min(700, max(5, rng.lognormvariate(math.log(90), 0.9))))
        output = " ".join(rng.choice(words) for _ in range(answer_words))
        records.append({"id": f"bench-{i}", "task": "bench", "instruction": instruction, "output": output})
    return records


def build_inputs(workdir: Path, records: int, seed: int, model: str) -> dict[str, str]:
    """The data artifact (train/validation JSONL) and the tokenizer, built once, and `model`'s directory."""
    from tunepipe.schemas.base_model import BaseModelConfig
    from tunepipe.tasks.base_model.stage import train_tokenizer, wrap_tokenizer

    data_dir, tokenizer_dir, model_dir = workdir / "data", workdir / "tokenizer", workdir / f"model-{model}"
    if not (data_dir / "train.jsonl").exists() or not (tokenizer_dir / "tokenizer.json").exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        rows = synthetic_records(records + 64, seed)
        for name, part in (("train", rows[:records]), ("validation", rows[records:])):
            with open(data_dir / f"{name}.jsonl", "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in part)
        spec = BaseModelConfig.model_validate({"tokenizer": {"vocab_size": 8000}, "architecture": {"max_position_embeddings": 4096}})
        wrap_tokenizer(train_tokenizer([r["instruction"] + "\n" + r["output"] for r in rows], spec), spec).save_pretrained(tokenizer_dir)
    if not (model_dir / "config.json").exists():
        build_model(model_dir, ARCHS[model], tokenizer_dir, seed)
    return {"data_dir": str(data_dir), "model_dir": str(model_dir)}


def build_model(model_dir: Path, arch: dict[str, Any], tokenizer_dir: Path, seed: int) -> None:
    """A randomly initialised Qwen2 model of `arch` (bf16), saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    fields = {k: v for k, v in arch.items() if k not in ("model_type", "rope_theta")}
    config = Qwen2Config(
        **fields, rope_parameters={"rope_type": "default", "rope_theta": arch["rope_theta"]},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


# --------------------------------------------------------------------------------------------
# One run (child process)


def clock_callback(log: list[dict[str, float]]):
    """Wall time and tokens seen at the end of every optimizer step (GPU work finished first)."""
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log.append({"step": state.global_step, "t": time.perf_counter(), "tokens": int(state.num_input_tokens_seen)})

    return Clock()



def profiler_callback(out_dir: Path, start_step: int, steps: int = 2):
    """A `torch.profiler` table of `steps` optimizer steps after `start_step` (CUDA and CPU time per op)."""
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class Profile(TrainerCallback):
        profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start_step and self.profiler is None:
                self.profiler = torch.profiler.profile(activities=activities, record_shapes=False)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == start_step + steps:
                self.profiler.__exit__(None, None, None)
                sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
                (out_dir / "profile.txt").write_text(self.profiler.key_averages().table(sort_by=sort, row_limit=40))
                self.profiler = None

    return Profile()


def callbacks(spec: dict[str, Any], clock: list[dict[str, float]]) -> list[Any]:
    out = [clock_callback(clock)]
    if spec.get("profile"):
        out.append(profiler_callback(Path(spec["run_dir"]), spec["warmup_steps"]))
    return out


def bench_env(spec: dict[str, Any]):
    """The profile of this run: `--environment`, with the benchmark's batch, kernels and Liger."""
    from tunepipe.tasks.core.environment import load_environment

    profile = load_environment(spec["environment"])
    return profile.model_copy(
        update={
            "attn_implementation": spec["attn"] or profile.attn_implementation,
            "packed_attention": spec["packed_attention"] if spec["packed_attention"] is not None else profile.packed_attention,
            "per_device_batch_size": spec["batch"],
            "liger_kernel": spec["liger"] and ("liger" in spec["variant"] or spec["variant"] in ("trl",)),
        }
    )


def sft_job(spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The sft stage's job dict for this run (what SFTStage.run hands to train_job)."""
    from tunepipe.schemas.sft import SFTConfig

    config = SFTConfig.model_validate(
        {
            "method": {"name": spec["method"], "r": spec["rank"], "alpha": 2 * spec["rank"], "dropout": 0.0},
            "max_length": spec["max_length"],
            "packing": "packing" in spec["variant"],
            "chat_template": "model",
            "training": {
                "max_steps": spec["steps"], "learning_rate": 1e-4, "warmup_ratio": 0.0, "logging_steps": 10,
                "save_steps": spec["steps"], "eval_steps": None, "seed": spec["seed"],
            },
            "heldout": {"max_examples_per_task": 0},
        }
    )
    return {
        "config": config.model_dump(mode="json"), "env": bench_env(spec).model_dump(mode="json"),
        "model_path": spec["model_dir"], "data_dir": spec["data_dir"], "tasks": None,
        "output_dir": str(out_dir), "save_to": "adapter", "checkpoint_dir": str(out_dir / "checkpoints"),
    }


def planned_memory(spec: dict[str, Any], *, packing: bool, loss_type: str) -> dict[str, Any]:
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.training.memory_plan import plan

    job = sft_job(spec, Path(spec["run_dir"]))
    config = SFTConfig.model_validate(job["config"])
    env = bench_env(spec)
    return plan(spec["model_dir"], config.method, env, spec["max_length"], config.training, packing=packing, loss_type=loss_type)["memory"]


def run_tunepipe(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    import tunepipe.tasks.training.trainer as trainer
    from tunepipe.tasks.sft.train import train_job

    job = sft_job(spec, out_dir)
    original = trainer.make_callbacks  # build_trainer's callbacks, plus the clock
    trainer.make_callbacks = lambda model, method, label="training": [*original(model, method, label), *callbacks(spec, clock)]
    try:
        metrics = train_job(job)
    finally:
        trainer.make_callbacks = original
    from tunepipe.tasks.lm.modeling import training_attention

    packed = "packing" in spec["variant"]
    env = bench_env(spec)
    return {"train_loss": metrics["train_loss"], "trainable": metrics["trainable_parameters"],
            "attention": training_attention(env.attn_implementation, env.packed_attention, padding_free=packed),
            "planned": planned_memory(spec, packing=packed, loss_type="chunked_nll")}


def _rows_and_tokenizer(spec: dict[str, Any], out_dir: Path) -> tuple[list[dict[str, list[int]]], Any]:
    from tunepipe.tasks.sft.train import prepare_sft

    prepared = prepare_sft(sft_job(spec, out_dir))  # tunepipe's encoding: identical token ids and labels on every side
    return prepared["train_rows"], prepared["tokenizer"]


def _bnb(spec: dict[str, Any]):
    import torch
    from transformers import BitsAndBytesConfig

    if spec["method"] != "qlora":
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _device_map():
    import torch

    return {"": 0} if torch.cuda.is_available() else None


def _lora_config(spec: dict[str, Any]):
    from peft import LoraConfig

    return LoraConfig(r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _common_args(spec: dict[str, Any], env: Any, out_dir: Path) -> dict[str, Any]:
    """Arguments every side shares (TrainingArguments keywords)."""
    return dict(
        output_dir=str(out_dir / "checkpoints"), max_steps=spec["steps"], learning_rate=1e-4, warmup_steps=0,
        lr_scheduler_type="cosine", weight_decay=0.0, seed=spec["seed"], data_seed=spec["seed"],
        per_device_train_batch_size=env.per_device_batch_size, gradient_accumulation_steps=env.gradient_accumulation_steps,
        gradient_checkpointing=env.gradient_checkpointing, bf16=env.dtype == "bfloat16", use_cpu=env.device == "cpu",
        logging_steps=10, save_strategy="no", optim="paged_adamw_8bit" if spec["method"] == "qlora" else "adamw_torch",
        report_to="none", include_num_input_tokens_seen="non_padding",
    )


def run_baseline(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    """Plain transformers.Trainer + PEFT, as a user would write it."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunepipe.tasks.training.peft_methods import count_parameters

    env = bench_env(spec)
    rows, tokenizer = _rows_and_tokenizer(spec, out_dir)
    quantization = _bnb(spec)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16 if env.dtype == "bfloat16" else torch.float32,
        attn_implementation=env.attn_implementation, quantization_config=quantization, device_map=_device_map(),
    )
    model.config.use_cache = False
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=env.gradient_checkpointing)
    model = get_peft_model(model, _lora_config(spec))
    args = TrainingArguments(**_common_args(spec, env, out_dir), remove_unused_columns=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=callbacks(spec, clock),
    )
    result = trainer.train()
    trainable, _ = count_parameters(model)
    return {"train_loss": round(float(result.training_loss), 6), "trainable": trainable,
            "planned": planned_memory(spec, packing=False, loss_type="nll")}


def _sft_config(spec: dict[str, Any], env: Any, out_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        **_common_args(spec, env, out_dir), max_length=spec["max_length"], packing=True, packing_strategy="bfd",
        padding_free=True, use_liger_kernel=env.liger_kernel, dataset_num_proc=None,
    )


def run_trl(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    """TRL's SFTTrainer as its documentation recommends for speed (packing, padding-free, Liger, best attention)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from tunepipe.tasks.lm.modeling import training_attention
    from tunepipe.tasks.training.peft_methods import count_parameters

    env = bench_env(spec)
    rows, tokenizer = _rows_and_tokenizer(spec, out_dir)
    attention = training_attention(env.attn_implementation, env.packed_attention, padding_free=True)
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16 if env.dtype == "bfloat16" else torch.float32,
        attn_implementation=attention, quantization_config=_bnb(spec), device_map=_device_map(),
    )
    model.config.use_cache = False
    trainer = SFTTrainer(
        model=model, args=_sft_config(spec, env, out_dir), train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=_lora_config(spec), callbacks=callbacks(spec, clock),
    )
    result = trainer.train()
    trainable, _ = count_parameters(trainer.model)
    return {"train_loss": round(float(result.training_loss), 6), "trainable": trainable, "attention": attention,
            "planned": planned_memory(spec, packing=True, loss_type="chunked_nll")}


def run_unsloth(spec: dict[str, Any], out_dir: Path, clock: list[dict[str, float]]) -> dict[str, Any]:
    """Unsloth's patched model and LoRA, trained by TRL's SFTTrainer with packing; unavailable where it does
    not import (it needs a CUDA GPU and its own pinned stack). Imported first: it patches transformers and trl."""
    try:
        from unsloth import FastLanguageModel  # noqa: I001  (must precede transformers/trl)
    except Exception as exc:  # ImportError, or its own "no GPU" NotImplementedError
        return {"unavailable": f"unsloth: {type(exc).__name__}: {str(exc)[:300]}"}
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    from tunepipe.tasks.training.peft_methods import count_parameters

    env = bench_env(spec)
    rows, _ = _rows_and_tokenizer(spec, out_dir)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model_dir"], max_seq_length=spec["max_length"], dtype=torch.bfloat16,
        load_in_4bit=spec["method"] == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model, r=spec["rank"], lora_alpha=2 * spec["rank"], lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if env.gradient_checkpointing else False, random_state=spec["seed"],
    )
    trainer = SFTTrainer(model=model, args=_sft_config(spec, env.model_copy(update={"liger_kernel": False}), out_dir),
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=callbacks(spec, clock))
    result = trainer.train()
    trainable, _ = count_parameters(trainer.model)
    return {"train_loss": round(float(result.training_loss), 6), "trainable": trainable}


SIDES = {"baseline": run_baseline, "trl": run_trl, "unsloth": run_unsloth}


def model_flops_per_token(model_dir: str, trainable: int, mean_context: float, *, convention: str = "lora") -> float:
    """Model FLOPs per trained token (see the module docstring). `convention`: "lora" = 4 N_matmul + 6 N_trainable
    + attention; "6n" = 6 N_matmul + attention (the usual full-training count)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    h, inter, layers, heads, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = h // heads
    per_block = h * h + 2 * h * kv * head_dim + h * h + 3 * h * inter  # q, k, v, o, gate/up/down
    matmul = layers * per_block + h * cfg.vocab_size  # + the output head (the embedding lookup is free)
    attention = 12 * layers * h * mean_context
    if convention == "6n":
        return 6 * matmul + attention
    return 4 * matmul + 6 * trainable + attention


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    out_dir = Path(spec["run_dir"])
    clock: list[dict[str, float]] = []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    side = SIDES.get(spec["variant"], run_tunepipe)(spec, out_dir, clock)
    if "unavailable" in side:
        return side
    wall = time.perf_counter() - started
    window = [c for c in clock if c["step"] >= spec["warmup_steps"]]
    if len(window) < 2:
        raise SystemExit(f"too few steps after warm-up: {len(clock)} steps, warm-up {spec['warmup_steps']}")
    tokens = window[-1]["tokens"] - window[0]["tokens"]
    seconds = window[-1]["t"] - window[0]["t"]
    steps = window[-1]["step"] - window[0]["step"]
    tokens_per_s = tokens / seconds
    flops = model_flops_per_token(spec["model_dir"], side["trainable"], spec["mean_context"])
    flops_6n = model_flops_per_token(spec["model_dir"], side["trainable"], spec["mean_context"], convention="6n")
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    # On a CPU (--smoke) the process's peak RSS stands in.
    measured = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    planned = side.pop("planned", None)
    return {
        **side,
        "steps_timed": steps,
        "tokens_timed": tokens,
        "seconds_timed": round(seconds, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_step": round(tokens / steps, 1),
        "peak_allocated_gb": round(measured, 3),
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
        "planned_memory_gb": planned["total_gb"] if planned else None,
        "planned_vs_measured": rounded(planned["total_gb"] / measured, 3) if planned and cuda else None,
        "planned": planned,
        "flops_per_token": flops,
        "mfu": rounded(flops * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "mfu_6n": rounded(flops_6n * tokens_per_s / (peak * 1e12), 4) if peak else None,
        "model_tflops_per_s": round(flops * tokens_per_s / 1e12, 3),
        "wall_s": round(wall, 1),
        "gpu": name,
    }


# --------------------------------------------------------------------------------------------
# The benchmark (parent)


def mean_context(data_dir: str, model_dir: str, max_length: int) -> float:
    """Token-weighted mean document length (each token attends within its own document)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with open(Path(data_dir) / "train.jsonl") as handle:
        for line in handle:
            r = json.loads(line)
            lengths.append(min(max_length, len(tokenizer(r["instruction"] + " " + r["output"])["input_ids"]) + 12))
    return sum(n * n for n in lengths) / sum(lengths)


def run_child(spec: dict[str, Any], log: Path, *, in_process: bool = False) -> dict[str, Any]:
    """One run in a fresh process (its own CUDA context and peak counters), or here (`--smoke`)."""
    if in_process:
        try:
            return child(spec)
        except Exception as exc:  # reported like a failed child, so one broken side does not hide the others
            return {"error": f"{type(exc).__name__}: {exc}"}
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    lines = [line for line in log.read_text().splitlines() if line.startswith("BENCH_RESULT ")]
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per setup (model/seq/method): medians per side, ratios against the plain baseline and against TRL
    configured for speed, and issue 19's targets."""
    summary: dict[str, Any] = {}
    for setup, by_variant in runs.items():
        ok = {v: [r for r in rs if "error" not in r and "unavailable" not in r] for v, rs in by_variant.items()}
        keys = ("tokens_per_s", "peak_allocated_gb", "mfu", "mfu_6n", "planned_vs_measured")
        med = {v: {k: median(r[k] for r in rs) for k in keys if rs[0].get(k) is not None} for v, rs in ok.items() if rs}
        rows: dict[str, Any] = {}
        for v, m in med.items():
            row = {k: rounded(x, 4) for k, x in m.items()}
            for ref in ("baseline", "trl"):
                if ref in med and v != ref:
                    row[f"speed_vs_{ref}"] = rounded(ratio(m["tokens_per_s"], med[ref]["tokens_per_s"]), 3)
                    row[f"memory_vs_{ref}"] = rounded(ratio(m["peak_allocated_gb"], med[ref]["peak_allocated_gb"]), 3)
            rows[v] = row
        for v, rs in by_variant.items():
            if v not in rows and rs:
                rows[v] = {"unavailable": rs[0]["unavailable"]} if "unavailable" in rs[0] else {"error": rs[0].get("error")}
        summary[setup] = rows
        summary[setup]["targets"] = targets(setup, rows)
    return summary


def targets(setup: str, rows: dict[str, Any]) -> dict[str, Any]:
    """Issue 19's targets for one setup: the best tunepipe side's MFU, its speed and memory against TRL, and the
    planner within 15% of every measured peak."""
    method = setup.rsplit("/", 1)[-1]
    ours = {v: rows[v] for v in TUNEPIPE_VARIANTS if v in rows and "tokens_per_s" in rows[v]}
    if not ours:
        return {}
    best = max(ours, key=lambda v: ours[v]["tokens_per_s"])
    out: dict[str, Any] = {"best_tunepipe_variant": best}
    if ours[best].get("mfu") is not None and method in MFU_TARGET:
        out["mfu"] = ours[best]["mfu"]
        out["mfu_met"] = ours[best]["mfu"] >= MFU_TARGET[method]
    if "speed_vs_trl" in ours[best]:
        out["speed_vs_trl"] = ours[best]["speed_vs_trl"]
        out["memory_vs_trl"] = ours[best]["memory_vs_trl"]
        out["floor_met"] = ours[best]["speed_vs_trl"] >= 1.0 and ours[best]["memory_vs_trl"] <= 1.0
        out["aim_met"] = ours[best]["speed_vs_trl"] >= 1.3 and ours[best]["memory_vs_trl"] <= 1.0
    plans = {v: r["planned_vs_measured"] for v, r in rows.items() if isinstance(r, dict) and r.get("planned_vs_measured")}
    if plans:
        out["planned_vs_measured"] = plans
        out["plan_within_15pct"] = all(abs(x - 1) <= PLAN_TOLERANCE for x in plans.values())
    return out


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs: repeats of a setup pooled, different models / sequence lengths side by side
    (one device call per setup), the summary recomputed. Steps, data, batch tokens, profile and kernels must agree."""
    per_call = ("build_s", "models", "seq_lengths")
    shared = {json.dumps({k: v for k, v in r["setup"].items() if k not in per_call}, sort_keys=True) for r in results}
    if len(shared) > 1:
        raise SystemExit("--merge: the results have different setups (steps, data, batch, profile): not comparable")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for result in results:
        for setup, by_variant in result["runs"].items():
            for variant, outcomes in by_variant.items():
                runs.setdefault(setup, {}).setdefault(variant, []).extend(outcomes)
    setup = {**results[0]["setup"],
             "models": {k: v for r in results for k, v in (r["setup"].get("models") or {}).items()},
             "seq_lengths": sorted({n for r in results for n in r["setup"].get("seq_lengths") or []})}
    summary = summarise(runs)
    return {**results[0], "setup": setup, "merged_from": [r["command"] for r in results], "runs": runs,
            "summary": summary, "table": table(summary)}


def _percent(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else ""


def table(summary: dict[str, Any]) -> str:
    """The README's markdown table of a summary."""
    lines = ["| model / seq / method | side | tokens/s | vs TRL | vs baseline | peak GiB | vs TRL | planned / measured | MFU | MFU (6N) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for setup, rows in summary.items():
        for side, r in rows.items():
            if side == "targets":
                continue
            if "tokens_per_s" not in r:
                lines.append(f"| {setup} | {side} | {r.get('unavailable') or r.get('error')} | | | | | | | |")
                continue
            lines.append(
                f"| {setup} | {side} | {r['tokens_per_s']:,.0f} | {r.get('speed_vs_trl', '')} | {r.get('speed_vs_baseline', '')} "
                f"| {r['peak_allocated_gb']:.1f} | {r.get('memory_vs_trl', '')} | {r.get('planned_vs_measured', '')} "
                f"| {_percent(r.get('mfu'))} | {_percent(r.get('mfu_6n'))} |"
            )
    return "\n".join(lines)


# `--smoke`: the sizes (methods and variants stay as given).
SMOKE = {"models": ["tiny"], "seq_lengths": [128], "steps": 3, "warmup_steps": 1, "records": 48, "tokens_per_batch": 512,
         "environment": "cpu", "attn": "sdpa", "packed_attention": [], "liger": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--models", nargs="+", default=["0.5b", "1.5b"], choices=list(ARCHS))
    parser.add_argument("--seq-lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--environment", default="single-gpu-80gb", help="profile name or YAML path (precision, checkpointing)")
    parser.add_argument("--attn", default="sdpa", help="attention kernel of padded rows instead of the profile's ('' keeps it)")
    parser.add_argument("--packed-attention", nargs="*", default=["flash_attention_2", "flex_attention"],
                        help="kernels for packed rows, first installed wins (the profile's packed_attention)")
    parser.add_argument("--no-liger", dest="liger", action="store_false", help="no Liger kernels on the trl and liger sides")
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="rows per micro-batch = this / the sequence length")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--records", type=int, default=6000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="write a torch.profiler table of two steps per run")
    parser.add_argument("--out", type=Path, help="also write the JSON result here")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine the runs of earlier results (repeats split over several sessions) and summarise them")
    parser.add_argument("--smoke", action="store_true",
                        help="every side on a tiny model on the CPU, in this process, in seconds (overrides the sizes, "
                        "profile and kernels; peak memory is then the process's cumulative RSS)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = child(json.loads(args.child))
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0
    if args.merge:
        merged = merge_results([json.loads(path.read_text()) for path in args.merge])
        if args.out:
            args.out.write_text(json.dumps(merged, indent=1))
        print(json.dumps(merged, indent=1))
        return 0
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tunepipe-gpu-sft-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    inputs = {model: build_inputs(workdir / "inputs", args.records, args.seed, model) for model in args.models}
    result: dict[str, Any] = {
        **header("gpu_sft.py", argv),
        "setup": {"models": {m: ARCHS[m] for m in args.models}, "seq_lengths": args.seq_lengths, "records": args.records,
                  "steps": args.steps, "warmup_steps": args.warmup_steps, "tokens_per_batch": args.tokens_per_batch,
                  "rank": args.rank, "environment": args.environment, "attn": args.attn,
                  "packed_attention": args.packed_attention, "liger": args.liger, "build_s": round(time.perf_counter() - started, 1)},
        "runs": {},
    }
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for model in args.models:
        for seq in args.seq_lengths:
            context = mean_context(inputs[model]["data_dir"], inputs[model]["model_dir"], seq)
            for method in args.methods:
                setup = f"{model}/{seq}/{method}"
                runs[setup] = {v: [] for v in args.variants}
                for repeat in range(args.repeats):
                    order = list(args.variants) if repeat % 2 == 0 else list(reversed(args.variants))
                    for variant in order:
                        run_dir = workdir / "runs" / f"{model}-{seq}-{method}-{variant.replace('+', '-')}-{repeat}"
                        run_dir.mkdir(parents=True, exist_ok=True)
                        spec = {**inputs[model], "method": method, "variant": variant, "environment": args.environment,
                                "attn": args.attn, "packed_attention": args.packed_attention, "liger": args.liger,
                                "batch": max(1, args.tokens_per_batch // seq), "steps": args.steps,
                                "warmup_steps": args.warmup_steps, "max_length": seq, "rank": args.rank, "seed": args.seed,
                                "mean_context": context, "run_dir": str(run_dir), "profile": args.profile}
                        outcome = run_child(spec, run_dir / "log.txt", in_process=args.smoke)
                        runs[setup][variant].append(outcome)
                        print(f"[gpu_sft] {setup} {variant} repeat {repeat}: "
                              + (outcome.get("error") or outcome.get("unavailable")
                                 or f"{outcome['tokens_per_s']} tok/s, {outcome['peak_allocated_gb']} GiB, MFU {outcome['mfu']}"),
                              file=sys.stderr, flush=True)
                        result["runs"] = runs
                        result["summary"] = summarise(runs)
                        if args.out:
                            args.out.write_text(json.dumps(result, indent=1))
    result["table"] = table(result["summary"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
