"""Shared builders for the training tests (no tests here): a tiny local model, a fake data artifact.

No model hub: the tokenizer is a byte-level BPE trained on a few sentences (through the
base_model stage's own functions), the model a 2-block Llama (hidden 64) built from a config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

from tunepipe.schemas.manifest import ArtifactRef

WORDS = (
    "the cat sat on the mat and the dog ran in the park while birds sang over green trees "
    "translate summarize classify positive negative sentiment answer question capital of france is paris "
    "one two three four five six seven eight nine ten red blue green yellow"
).split()

TASKS = {
    "sentiment": [("Classify the sentiment.", f"I love the {w}.", "positive") for w in WORDS[:6]]
    + [("Classify the sentiment.", f"I hate the {w}.", "negative") for w in WORDS[6:12]],
    "count": [("Count to three.", "", "one two three"), ("Name a colour.", "", "red"), ("Say a number.", "", "seven")] * 3,
}


def records(split: str) -> list[dict]:
    out = []
    for task, rows in TASKS.items():
        for i, (instruction, inp, output) in enumerate(rows):
            if (split == "validation") != (i % 4 == 3):
                continue
            out.append({"id": f"{task}-{i}", "task": task, "instruction": instruction, "input": inp, "output": output})
    if split == "train":  # one chat-format record, too
        out.append(
            {"id": "chat-0", "task": "count", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Count to two."},
                {"role": "assistant", "content": "one two"},
            ]}
        )
    return out


def corpus() -> list[dict]:
    return [{"id": f"doc-{i}", "text": " ".join(WORDS[i : i + 20])} for i in range(0, len(WORDS), 3)]


def write_data_artifact(path: Path, *, long_record: bool = False) -> ArtifactRef:
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = records(split)
        if long_record and split == "train":
            rows.append({"id": "long", "task": "count", "instruction": " ".join(WORDS * 3), "input": "", "output": "ten"})
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus()))
    return ArtifactRef(stage="data", key="data" + ("long" if long_record else "k"), path=str(path))


def build_tiny_model(path: Path, *, biases: bool = False, hidden_size: int = 64, num_key_value_heads: int = 2,
                     max_position_embeddings: int = 256) -> Path:
    """A 2-block Llama (hidden 64) with a ~400-token BPE tokenizer and the ChatML-like template.
    (vLLM's CPU attention wants a head size of at least 32: hidden_size=128 gives that.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunepipe.schemas.base_model import ArchitectureSpec, BaseModelConfig, TokenizerSpec
    from tunepipe.tasks.base_model.stage import train_tokenizer, wrap_tokenizer

    config = BaseModelConfig(
        tokenizer=TokenizerSpec(vocab_size=400, min_frequency=1),
        architecture=ArchitectureSpec(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                                      max_position_embeddings=max_position_embeddings),
    )
    texts = [" ".join(WORDS)] * 3 + [r["instruction"] + " " + r["output"] for r in records("train") if "instruction" in r]
    tokenizer = wrap_tokenizer(train_tokenizer(texts, config), config)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=biases, mlp_bias=biases,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(model_config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cpu_profile(**update):
    from tunepipe.tasks.core.environment import load_environment

    return load_environment("cpu").model_copy(update={"per_device_batch_size": 4, **update})


def kill_script(store_root: Path, data: ArtifactRef, config: dict) -> str:
    """A child process running the sft stage (for the kill-and-resume test)."""
    return textwrap.dedent(
        f"""
        import json
        from tunepipe.schemas.manifest import ArtifactRef
        from tunepipe.schemas.sft import SFTConfig
        from tunepipe.tasks.core.artifacts import ArtifactStore
        from tunepipe.tasks.sft.stage import SFTStage
        from tunepipe.tasks.core.stage import run_stage
        from tests.helpers.training import cpu_profile
        config = SFTConfig.model_validate(json.loads({json.dumps(json.dumps(config))}))
        run_stage(SFTStage(), config, {{"data": ArtifactRef.model_validate({data.model_dump()!r})}},
                  ArtifactStore({str(store_root)!r}), cpu_profile())
        """
    )


# --------------------------------------------------------------------------------------------
# Kill-and-resume tests (sft, align)

# Prepended to a child's script: slows each optimizer step so a kill lands between checkpoints.
SLOW_STEPS = """
import time
from transformers import Trainer
_step = Trainer.training_step
def _slow(self, *args, **kwargs):
    time.sleep(0.3)
    return _step(self, *args, **kwargs)
Trainer.training_step = _slow
"""


def complete_checkpoints(root: Path, stage: str, run: str) -> list[int]:
    """Steps of the checkpoints of `stage`'s `run` whose trainer state is fully written."""
    steps = []
    for state in root.glob(f"{stage}/.staging/*/.checkpoints/{run}/checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except ValueError:
            continue
        steps.append(int(state.parent.name.split("-")[1]))
    return sorted(steps)


def kill_at_first_checkpoint(proc: subprocess.Popen, root: Path, stage: str, run: str, timeout_s: float) -> list[int]:
    """SIGKILL `proc` as soon as `stage`'s `run` has a complete checkpoint; the checkpoints it left."""
    try:
        deadline = time.monotonic() + timeout_s
        while not complete_checkpoints(root, stage, run):
            assert proc.poll() is None, f"the {stage} process ended before the first checkpoint of run {run}"
            assert time.monotonic() < deadline, f"no checkpoint of {stage} run {run} within {timeout_s} s"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return complete_checkpoints(root, stage, run)


# --------------------------------------------------------------------------------------------
# Method cases shared by test_sft_methods*.py

METHODS = {
    "full": {"name": "full"},
    "freeze": {"name": "freeze", "train_last_layers": 1, "train_modules": ["lm_head"]},
    "bitfit": {"name": "bitfit"},
    "lora": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    "lora-rslora-dora-all-linear": {"name": "lora", "r": 4, "use_rslora": True, "use_dora": True},
    "lora-pissa": {"name": "lora", "r": 4, "init": "pissa"},
    "lora-olora": {"name": "lora", "r": 4, "init": "olora", "target_modules": ["q_proj", "k_proj"]},
    "qlora-nf4": {"name": "qlora", "r": 4, "quant_type": "nf4", "double_quant": True, "optimizer": "paged_adamw_8bit"},
    "qlora-fp4": {"name": "qlora", "r": 4, "quant_type": "fp4", "double_quant": False, "optimizer": "adamw_8bit"},
    "adalora": {"name": "adalora", "init_r": 6, "target_r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {"name": "ia3"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4, "init": "text", "init_text": "classify the sentiment"},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"name": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 32},
}
CONVERTED = {"lora-pissa", "lora-olora"}  # saved as plain LoRA on the original base: equal up to rounding


def method_assets(root: Path) -> dict:
    return {
        "model": build_tiny_model(root / "llama"),
        "biased": build_tiny_model(root / "llama-bias", biases=True),
        "data": write_data_artifact(root / "data"),
    }


def _job(assets, tmp_path, method: dict) -> dict:
    model = assets["biased"] if method["name"] == "bitfit" else assets["model"]
    from tunepipe.schemas.sft import SFTConfig

    config = SFTConfig.model_validate(
        {"model": str(model), "method": method, "max_length": 64,
         "training": {"max_steps": 3, "learning_rate": 1e-2, "warmup_ratio": 0.0, "save_steps": 100}}
    )
    return {
        "config": config.model_dump(mode="json"), "env": cpu_profile().model_dump(mode="json"),
        "model_path": str(model), "data_dir": assets["data"].path, "tasks": None,
        "output_dir": str(tmp_path), "save_to": "result", "checkpoint_dir": str(tmp_path / "ckpt"),
    }


def _snapshot(model) -> dict:
    return {n: (p.requires_grad, p.detach().float().clone()) for n, p in model.named_parameters()}


def check_method(assets, tmp_path, case: str) -> None:
    """Train a few steps; trainable weights move, frozen ones do not; the result reloads identically."""
    import torch

    from tunepipe.tasks.training.trainer import fit, load_base
    from tunepipe.tasks.sft.train import save_result, sft_trainer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = _job(assets, tmp_path, METHODS[case])
    trainer, prepared = sft_trainer(job)
    method = prepared["config"].method
    before = _snapshot(trainer.model)
    trainable = [n for n, (grad, _) in before.items() if grad]
    assert trainable, "nothing trainable"
    fit(trainer, job["checkpoint_dir"])
    after = _snapshot(trainer.model)

    moved = [n for n in trainable if not torch.equal(before[n][1], after[n][1])]
    assert moved == trainable, f"trainable but unchanged: {sorted(set(trainable) - set(moved))}"
    frozen_moved = [n for n, (grad, value) in before.items() if not grad and not torch.equal(value, after[n][1])]
    assert frozen_moved == [], f"frozen but changed: {frozen_moved}"
    if case == "bitfit":
        assert all(n.endswith("bias") for n in trainable)
    if case == "freeze":
        assert all(".layers.1." in n or "lm_head" in n for n in trainable)
        assert any(".layers.0." in n for n in before) and not any(".layers.0." in n for n in trainable)

    dest = tmp_path / "result"
    save_result(trainer, prepared["tokenizer"], method, dest, prepared["initial_adapter"])
    env = cpu_profile()
    if method.is_peft:
        assert (dest / "adapter_config.json").exists() and (dest / "adapter_model.safetensors").exists()
        reloaded = PeftModel.from_pretrained(load_base(job["model_path"], method, env), str(dest))
    else:
        assert (dest / "config.json").exists() and (dest / "model.safetensors").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
    assert (dest / "tokenizer.json").exists()

    ids = torch.tensor([prepared["train_rows"][0]["input_ids"]])
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = reloaded.eval()(input_ids=ids).logits
    if case in CONVERTED:
        # The trained model runs on the PiSSA/OLoRA residual base; the saved adapter is converted
        # to a plain LoRA (rank 2r) on the original weights.
        import json

        assert json.loads((dest / "adapter_config.json").read_text())["r"] == 2 * method.r
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    elif case == "adalora":
        # The saved rank pattern re-sizes the pruned matrices on load: same values, summation
        # order differs (~1e-7).
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(got, expected)


# --------------------------------------------------------------------------------------------
# Entry points for the launcher tests (run inside launched workers)


def echo_job(job: dict) -> dict:
    print(f"worker says {job['message']}", flush=True)
    return {"message": job["message"], "rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1"))}


def failing_job(job: dict) -> dict:
    print("about to fail", flush=True)
    raise RuntimeError("planted failure in the worker")
