"""Shared builders for the reward/align tests (no tests here): an SFT artifact on the tiny model,
preference pairs designed against the SFT policy, the quickstart's preference pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunepipe.schemas.manifest import ArtifactRef
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.artifacts import ArtifactStore
from tunepipe.tasks.sft.stage import SFTStage
from tunepipe.tasks.core.stage import run_stage
from tests.helpers.training import WORDS, build_tiny_model, cpu_profile, write_data_artifact

QUICKSTART_PREFERENCES = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "data" / "preferences.jsonl"
# Two answers that differ in one token; which one is `chosen` is decided against the SFT policy.
ANSWERS = ("the cat sat", "the dog sat")


def env():
    return cpu_profile(per_device_batch_size=4)


def build_assets(root: Path) -> dict:
    """Tiny model, data artifact, and a LoRA SFT artifact trained a few steps on it."""
    model = build_tiny_model(root / "llama")
    data = write_data_artifact(root / "data")
    store = ArtifactStore(root / "artifacts")
    config = SFTConfig.model_validate(
        {"model": str(model), "method": {"name": "lora", "r": 4}, "max_length": 64,
         "training": {"max_steps": 20, "learning_rate": 1e-2, "warmup_ratio": 0.0}, "heldout": {"max_examples_per_task": 0}}
    )
    sft = run_stage(SFTStage(), config, {"data": data}, store, env())
    return {"root": root, "model": model, "data": data, "store": store, "sft": sft}


def data_with_pairs(assets: dict, name: str, pairs: list[dict]) -> ArtifactRef:
    """A copy of the tiny data artifact with `preferences.jsonl` holding `pairs`."""
    path = assets["root"] / name
    if not path.exists():
        shutil.copytree(assets["data"].path, path)
    (path / "preferences.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return ArtifactRef(stage="data", key=f"data-{name}", path=str(path))


def quickstart_pairs() -> list[dict]:
    """The quickstart's pairs; every fifth held out (the data stage's split does this in a pipeline)."""
    rows = [json.loads(line) for line in QUICKSTART_PREFERENCES.read_text().splitlines() if line.strip()]
    return [{**r, "id": f"q{i}", "split": "test" if i % 5 == 4 else "train"} for i, r in enumerate(rows)]


def pairs_against_sft(assets: dict) -> list[dict]:
    """Pairs preferring, on every prompt, the one of ANSWERS that the SFT policy finds less likely
    on average: the SFT policy's held-out preference accuracy starts low and DPO must raise it."""
    import json as _json

    from peft import PeftModel

    from tunepipe.tasks.align.evaluation import response_logprobs
    from tunepipe.tasks.lm.modeling import load_model, load_tokenizer

    sft_dir = Path(assets["sft"].path)
    adapter = sft_dir / _json.loads((sft_dir / "outputs.json").read_text())["paths"]["all"]
    tokenizer = load_tokenizer(str(adapter))
    policy = PeftModel.from_pretrained(load_model(str(assets["model"])), str(adapter)).eval()
    prompts = [f"Describe the {w}." for w in WORDS[:30]]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    first = sum(response_logprobs(policy, tokenizer, messages, [ANSWERS[0]] * len(prompts), 16))
    second = sum(response_logprobs(policy, tokenizer, messages, [ANSWERS[1]] * len(prompts), 16))
    chosen, rejected = (ANSWERS[0], ANSWERS[1]) if first < second else (ANSWERS[1], ANSWERS[0])
    return [
        {"id": f"d{i}", "task": "count", "prompt": p, "chosen": chosen, "rejected": rejected, "split": "test" if i % 3 == 2 else "train"}
        for i, p in enumerate(prompts)
    ]
