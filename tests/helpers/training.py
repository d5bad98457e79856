"""Shared builders for the training tests (no tests here): a tiny local model, a fake data artifact.

No model hub: the tokenizer is a byte-level BPE trained on a few sentences (through the
base_model stage's own functions), the model a 2-block Llama (hidden 64) built from a config.
"""

from __future__ import annotations

import json
import logging
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


def build_tiny_model(path: Path, *, biases: bool = False, texts: list[str] | None = None, hidden_size: int = 64,
                     num_key_value_heads: int = 2, max_position_embeddings: int = 256) -> Path:
    """A 2-block Llama (hidden 64) with a ~400-token BPE tokenizer and the ChatML-like template
    (trained on `texts` as well when given). vLLM's CPU attention wants a head size of at least
    32: hidden_size=128 gives that."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from tunepipe.schemas.base_model import (
        ArchitectureSpec,
        BaseModelConfig,
        TokenizerSpec,
    )
    from tunepipe.tasks.base_model.stage import train_tokenizer, wrap_tokenizer

    config = BaseModelConfig(
        tokenizer=TokenizerSpec(vocab_size=400, min_frequency=1),
        architecture=ArchitectureSpec(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=num_key_value_heads,
                                      max_position_embeddings=max_position_embeddings),
    )
    texts = [" ".join(WORDS)] * 3 + [r["instruction"] + " " + r["output"] for r in records("train") if "instruction" in r] + list(texts or [])
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


def build_tiny_moe(path: Path, kind: str) -> Path:
    """A randomly initialised 2-block Mixture-of-Experts model (4 experts, 2 per token) with the tiny
    model's tokenizer: `mixtral` (MixtralConfig) or `qwen2_moe` (Qwen2MoeConfig, with a shared expert)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        MixtralConfig,
        Qwen2MoeConfig,
    )

    dense = path.parent / f"{path.name}-tokenizer"
    if not dense.exists():
        build_tiny_model(dense)
    tokenizer = AutoTokenizer.from_pretrained(str(dense))
    common = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False, "num_experts_per_tok": 2,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "mixtral":
        config = MixtralConfig(intermediate_size=96, num_local_experts=4, router_aux_loss_coef=0.02, **common)
    elif kind == "qwen2_moe":
        config = Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4,
                                decoder_sparse_step=1, router_aux_loss_coef=0.02, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


QUICKSTART_DATA = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "data"


def quickstart_records(per_task: int = 60) -> list[dict]:
    """The quickstart's two instruction tasks (triples, sentiment), `per_task` records each, every
    fourth one in validation (the data stage's own split is not needed to compare adapters)."""
    import csv

    triples = [json.loads(line) for line in (QUICKSTART_DATA / "triples.jsonl").read_text().splitlines() if line.strip()]
    with open(QUICKSTART_DATA / "sentiment_extra.csv", newline="") as handle:
        sentiment = list(csv.DictReader(handle))
    out = []
    for task, rows in (("triples", triples[:per_task]), ("sentiment", sentiment[:per_task])):
        for i, row in enumerate(rows):
            split = "validation" if i % 4 == 3 else "train"
            out.append({"id": f"{task}-{i}", "task": task, "split": split, "instruction": row["instruction"],
                        "input": row["input"], "output": row["output"]})
    return out


def write_quickstart_artifact(path: Path, per_task: int = 60) -> ArtifactRef:
    """A data artifact of `quickstart_records` (train / validation; test = validation)."""
    path.mkdir(parents=True, exist_ok=True)
    rows = quickstart_records(per_task)
    for split in ("train", "validation", "test"):
        wanted = "train" if split == "train" else "validation"
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == wanted))
    return ArtifactRef(stage="data", key=f"quickstart{per_task}", path=str(path))


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
    "p_tuning_v2": {"name": "p_tuning_v2", "num_virtual_tokens": 4},
    "lora_plus": {"name": "lora_plus", "r": 4, "lr_ratio": 16},
    "galore": {"name": "galore", "rank": 8, "update_proj_gap": 2, "target_modules": [r".*self_attn.*", r".*mlp.*"]},
    "adapter": {"name": "adapter", "bottleneck_size": 8},
    "adapter-parallel": {"name": "adapter", "bottleneck_size": 8, "placement": "parallel", "scaling": 4.0},
    "adapter_drop": {"name": "adapter_drop", "bottleneck_size": 8, "drop_first_layers": 1},
    "mam_adapter": {"name": "mam_adapter", "prefix_length": 4, "bottleneck_size": 16},
    "unipelt": {"name": "unipelt", "lora_r": 4, "prefix_length": 4, "bottleneck_size": 8},
}
CONVERTED = {"lora-pissa", "lora-olora"}
# The seeds' methods added beside PEFT's: their loss on the training rows must fall in the few steps.
LOSS_CHECKED = {"p_tuning_v2", "lora_plus", "galore", "adapter", "adapter-parallel", "adapter_drop", "mam_adapter", "unipelt"}


def batch_loss(model, rows: list[dict]) -> float:
    """Mean loss over the training rows (eval mode: no dropout), one row at a time."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss) for r in rows]
    model.train(was_training)
    return sum(losses) / len(losses)  # saved as plain LoRA on the original base: equal up to rounding


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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunepipe.tasks.sft.train import save_result, sft_trainer
    from tunepipe.tasks.training.trainer import fit, load_base

    job = _job(assets, tmp_path, METHODS[case])
    trainer, prepared = sft_trainer(job)
    method = prepared["config"].method
    before = _snapshot(trainer.model)
    trainable = [n for n, (grad, _) in before.items() if grad]
    assert trainable, "nothing trainable"
    loss_before = batch_loss(trainer.model, prepared["train_rows"]) if case in LOSS_CHECKED else None
    fit(trainer, job["checkpoint_dir"])
    after = _snapshot(trainer.model)
    if case in LOSS_CHECKED:
        loss_after = batch_loss(trainer.model, prepared["train_rows"])
        assert loss_after < loss_before, f"training loss did not fall: {loss_before:.4f} -> {loss_after:.4f}"

    moved = [n for n in trainable if not torch.equal(before[n][1], after[n][1])]
    assert moved == trainable, f"trainable but unchanged: {sorted(set(trainable) - set(moved))}"
    frozen_moved = [n for n, (grad, value) in before.items() if not grad and not torch.equal(value, after[n][1])]
    assert frozen_moved == [], f"frozen but changed: {frozen_moved}"
    if case == "bitfit":
        assert all(n.endswith("bias") for n in trainable)
    if case == "freeze":
        assert all(".layers.1." in n or "lm_head" in n for n in trainable)
        assert any(".layers.0." in n for n in before) and not any(".layers.0." in n for n in trainable)
    check_method_specifics(trainer, method, trainable)

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
    if method.is_peft and engine_serves(dest):
        check_served(job["model_path"], dest, reloaded, ids)


def engine_serves(adapter_dir: Path) -> bool:
    """Whether the embedded engine takes the adapter: every bottleneck adapter; the LoRA adapters
    vLLM would serve too (it refuses DoRA, modules_to_save, ... as vLLM does, by design)."""
    from tunepipe.tasks.serving.engine import AdapterError, check_adapter

    if peft_type(adapter_dir) == "BOTTLENECK":
        return True
    try:
        check_adapter(adapter_dir, max_rank=64)
    except AdapterError:
        return False
    return True


def peft_type(adapter_dir: Path) -> str:
    import json

    return json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"]


def engine_tokens(engine, prompt_ids: list[int], adapter: str | None, max_tokens: int = 6) -> list[int]:
    """Greedy tokens the embedded engine generates for one row."""
    from tunepipe.tasks.serving.engine import Row

    rows = [Row(prompt_ids=list(prompt_ids), adapter=adapter, max_tokens=max_tokens, emit=lambda event: None)]
    engine.generate(rows)
    return rows[0].tokens


def offline_tokens(model, prompt_ids: list[int], eos_ids: set[int], max_tokens: int = 6) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt_ids):].tolist()
    return [t for t in out[: next((i for i, t in enumerate(out) if t in eos_ids), len(out))]]


def check_served(model_path: str, adapter_dir: Path, reloaded, ids) -> None:
    """The embedded engine serves the adapter: its greedy answer is the reloaded model's."""
    from tunepipe.tasks.serving.engine import MultiLoraEngine

    engine = MultiLoraEngine(model_path)
    engine.load_adapter("served", adapter_dir)
    prompt = ids[0, :12].tolist()
    assert engine_tokens(engine, prompt, "served") == offline_tokens(reloaded, prompt, engine.eos_ids)


def check_method_specifics(trainer, method, trainable: list[str]) -> None:
    """What makes each newer method itself: adapters where the paper puts them, LoRA+'s faster B,
    GaLore's optimizer."""
    name = method.name
    if name in ("adapter", "adapter_drop"):
        assert all(".bottleneck_" in n for n in trainable)
        blocks = {n.split(".layers.")[1].split(".")[0] for n in trainable}
        places = {n.split(".bottleneck_")[0].rsplit(".", 1)[-1] for n in trainable}
        assert places == {"self_attn", "mlp"}, places
        assert blocks == ({"1"} if name == "adapter_drop" else {"0", "1"}), blocks  # AdapterDrop: block 0 has none
    if name == "mam_adapter":
        roles = {n.split(".bottleneck_")[0].rsplit(".", 1)[-1] + ":" + n.split(".bottleneck_")[1].split(".")[0] for n in trainable}
        assert roles == {"k_proj:prefix_keys", "k_proj:prefix_values", "mlp:down", "mlp:up"}, roles
    if name == "unipelt":
        roles = {n.split(".bottleneck_")[0].rsplit(".", 1)[-1] + ":" + n.split(".bottleneck_")[1].split(".")[0] for n in trainable}
        assert roles == {"q_proj:lora_A", "q_proj:lora_B", "q_proj:lora_gate", "v_proj:lora_A", "v_proj:lora_B", "v_proj:lora_gate",
                         "k_proj:prefix_keys", "k_proj:prefix_values", "k_proj:prefix_gate",
                         "mlp:down", "mlp:up", "mlp:gate"}, roles
    if name == "lora_plus":
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        rates = {}
        for group in inner.param_groups:
            for param in group["params"]:
                rates[id(param)] = group["lr"] if "initial_lr" not in group else group["initial_lr"]
        named = dict(trainer.model.named_parameters())
        a = {rates[id(named[n])] for n in trainable if ".lora_A." in n}
        b = {rates[id(named[n])] for n in trainable if ".lora_B." in n}
        assert len(a) == 1 and len(b) == 1 and abs(b.pop() / a.pop() - method.lr_ratio) < 1e-9
    if name == "galore":
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        assert type(inner).__module__.startswith("galore_torch"), type(inner)
        projected = [g for g in inner.param_groups if "rank" in g]
        assert projected and projected[0]["rank"] == method.rank and projected[0]["params"]
    if name == "p_tuning_v2":
        config = trainer.model.peft_config["default"]
        assert type(config).__name__ == "PrefixTuningConfig" and not config.prefix_projection


# --------------------------------------------------------------------------------------------
# Entry points for the launcher tests (run inside launched workers)


def echo_job(job: dict) -> dict:
    print(f"worker says {job['message']}", flush=True)
    return {"message": job["message"], "rank": int(os.environ.get("RANK", "0")), "world": int(os.environ.get("WORLD_SIZE", "1"))}


def failing_job(job: dict) -> dict:
    print("about to fail", flush=True)
    raise RuntimeError("planted failure in the worker")


def collecting_logger(name: str) -> tuple[logging.Logger, list[str]]:
    """Logger `name` with its records' messages collected in the returned list (its only handler)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    return logger, lines


def plant_loss(monkeypatch, trainer_class, planted) -> None:
    """Pass every loss `trainer_class.compute_loss` returns through `planted` (a NaN, a constant), as a broken run would."""
    original = trainer_class.compute_loss

    def compute_loss(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return (planted(out[0]), *out[1:]) if isinstance(out, tuple) else planted(out)

    monkeypatch.setattr(trainer_class, "compute_loss", compute_loss)


def sft_key_payload(method: str = "lora") -> dict:
    """What a real sft manifest records as its config (the payload its key was computed from): what a
    hand-made sft-shaped artifact needs, as later stages read it typed."""
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.sft.stage import SFTStage

    return SFTStage().key_payload(SFTConfig.model_validate({"method": method}))


def write_sft_manifest(path: Path, key: str, method: str = "lora") -> ArtifactRef:
    """An sft manifest over a hand-made sft-shaped artifact directory (adapter or model + outputs.json)."""
    from tunepipe.schemas.manifest import Manifest, Timings

    manifest = Manifest(stage="sft", key=key, code_version="test", config=sft_key_payload(method),
                        timings=Timings(started_at="t", finished_at="t", seconds=0.0))
    (path / "manifest.json").write_text(manifest.model_dump_json())
    return ArtifactRef(stage="sft", key=key, path=str(path))
