"""AdapterFusion, the seeds' two-stage method, on the quickstart's two tasks: per-task bottleneck
adapters (`method: adapter`, `adapters: per_task`), then an `adapter_fusion` run over them on the
union of tasks. The fused model's loss on the union's validation records is at most each single
adapter's, the task adapters inside it are the per-task run's (frozen), and the fusion trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.training import build_tiny_model, cpu_profile, quickstart_records, write_quickstart_artifact

torch.set_num_threads(1)
TRAINING = {"max_steps": 60, "learning_rate": 5e-2, "warmup_ratio": 0.0, "save_steps": 100}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tunepipe.schemas.sft import SFTConfig
    from tunepipe.tasks.core.artifacts import ArtifactStore
    from tunepipe.tasks.core.stage import run_stage
    from tunepipe.tasks.sft.stage import SFTStage

    root = tmp_path_factory.mktemp("fusion")
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in quickstart_records()]
    model = build_tiny_model(root / "llama", texts=texts)
    data = write_quickstart_artifact(root / "data")
    store = ArtifactStore(root / "artifacts")
    common = {"model": str(model), "max_length": 96, "training": TRAINING, "heldout": {"max_examples_per_task": 0}}
    per_task = run_stage(
        SFTStage(), SFTConfig.model_validate({**common, "method": {"name": "adapter", "bottleneck_size": 64}, "adapters": "per_task"}),
        {"data": data}, store, cpu_profile(),
    )
    fused = run_stage(
        SFTStage(), SFTConfig.model_validate({**common, "method": {"name": "adapter_fusion", "adapters_from": per_task.path}}),
        {"data": data}, store, cpu_profile(),
    )
    return {"model": model, "data": data, "per_task": Path(per_task.path), "fused": Path(fused.path)}


def union_loss(model_path: Path, adapter: Path, data_dir: str) -> float:
    """Mean answer-token loss over the validation records of every task."""
    from peft import PeftModel

    from tunepipe.tasks.lm.encoding import encode_records, read_split
    from tunepipe.tasks.lm.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(adapter))
    by_task, _ = encode_records(read_split(data_dir, "validation"), tokenizer, tokenizer.chat_template, max_length=96, train_on_inputs=False)
    model = PeftModel.from_pretrained(load_model(str(model_path)), str(adapter)).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for rows in by_task.values():
            for row in rows:
                labels = torch.tensor([row["labels"]])
                n = int((labels[:, 1:] != -100).sum())
                loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss
                total, tokens = total + float(loss) * n, tokens + n
    return total / tokens


def test_fused_model_matches_or_beats_each_task_adapter_on_the_union(runs):
    tasks = sorted(p.name for p in (runs["per_task"] / "adapters").iterdir())
    assert tasks == ["sentiment", "triples"]
    single = {t: union_loss(runs["model"], runs["per_task"] / "adapters" / t, runs["data"].path) for t in tasks}
    fused = union_loss(runs["model"], runs["fused"] / "adapter", runs["data"].path)
    print(f"union validation loss: fused {fused:.4f}, single {single}")
    for task, loss in single.items():
        assert fused <= loss, f"fused {fused:.4f} is worse than the {task} adapter alone ({loss:.4f}) on the union of tasks"


def test_fusion_keeps_the_task_adapters_and_trains_only_the_fusion(runs):
    from safetensors.torch import load_file

    fused = load_file(str(runs["fused"] / "adapter" / "adapter_model.safetensors"))
    config = json.loads((runs["fused"] / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" and config["fusion"] == ["sentiment", "triples"]
    for index, task in enumerate(config["fusion"]):
        own = load_file(str(runs["per_task"] / "adapters" / task / "adapter_model.safetensors"))
        assert own
        for key, value in own.items():
            kind = "down" if ".bottleneck_down." in key else "up"
            module, leaf = key.split(f".bottleneck_{kind}.")
            assert torch.equal(fused[f"{module}.bottleneck_fusion_{kind}_{leaf}"][index], value), key
    values = [v for k, v in fused.items() if ".bottleneck_fusion_value." in k and k.endswith("weight")]
    assert values and all(not torch.equal(v, torch.eye(v.shape[0])) for v in values), "the fusion value layers did not train"
    metrics = json.loads((runs["fused"] / "metrics.json").read_text())["all"]
    trainable = sum(v.numel() for k, v in fused.items() if ".bottleneck_fusion_query." in k or ".bottleneck_fusion_key." in k
                    or ".bottleneck_fusion_value." in k)
    assert metrics["trainable_parameters"] == trainable
    losses = [p["loss"] for p in metrics["loss_history"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
