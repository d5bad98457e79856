"""The profile's speed options for the training stages, checked for correctness on a CPU (their speed is a
device matter: benchmarks/gpu_sft.py): `torch_compile` trains the same numbers, `length_bucketing` batches
similar lengths together so padded batches waste fewer tokens."""

from __future__ import annotations

import pytest
import torch

from tunepipe.schemas.sft import SFTConfig
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    return {"model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data"),
            "varied": _varied_lengths(root / "varied")}


def _varied_lengths(path, rows: int = 128):
    """Enough records of spread-out lengths for the Trainer's length grouping (it sorts within megabatches
    of up to 50 batches, and only when the set holds at least 4 batches per megabatch)."""
    import json
    import random

    from tests.helpers.training import WORDS

    rng = random.Random(0)
    path.mkdir(parents=True)
    for split, n in (("train", rows), ("validation", 4)):
        records = [{"id": f"{split}-{i}", "task": "t", "instruction": "Say it.", "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))}
                   for i in range(n)]
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return type("Data", (), {"path": str(path)})()


def _trainer(assets, tmp_path, env, data="data", **config):
    from tunepipe.tasks.sft.train import sft_trainer

    config = {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 96,
              "training": {"max_steps": 3, "warmup_ratio": 0.0, "learning_rate": 1e-2, "save_steps": 100}, **config}
    job = {"config": SFTConfig.model_validate(config).model_dump(mode="json"), "env": env.model_dump(mode="json"),
           "model_path": str(assets["model"]), "data_dir": assets[data].path, "tasks": None,
           "output_dir": str(tmp_path), "save_to": "out", "checkpoint_dir": str(tmp_path / "ckpt")}
    return sft_trainer(job)[0]


def test_torch_compile_reaches_the_trainer_and_computes_the_same_loss_and_gradients(assets, tmp_path):
    compiled = _trainer(assets, tmp_path, cpu_profile(torch_compile=True))
    assert compiled.args.torch_compile and not _trainer(assets, tmp_path, cpu_profile()).args.torch_compile
    # What the Trainer compiles, on one real batch. Inductor's C++ build would cost minutes on 2 cores (and
    # a whole training run recompiles per batch shape), so the check compiles with aot_eager: the same
    # Dynamo capture and AOT-autograd forward/backward graphs, without code generation.
    model = compiled.model.eval()  # no dropout: both passes must see the same network
    batch = next(iter(compiled.get_train_dataloader()))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch, use_cache=False).loss
    grads = torch.autograd.grad(loss, params)
    compiled_loss = torch.compile(model, backend="aot_eager")(**batch, use_cache=False).loss
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    torch.testing.assert_close(compiled_loss, loss, atol=1e-6, rtol=1e-6)
    for got, expected in zip(compiled_grads, grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def _padding(trainer) -> tuple[int, int]:
    """(padded positions, real tokens) over one pass of the training dataloader."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        padded += int(batch["attention_mask"].numel() - batch["attention_mask"].sum())
    return padded, real


def test_length_bucketing_cuts_padding_and_leaves_packed_rows_alone(assets, tmp_path):
    random_order = _trainer(assets, tmp_path, cpu_profile(), data="varied")
    bucketed = _trainer(assets, tmp_path, cpu_profile(length_bucketing=True), data="varied")
    assert bucketed.args.train_sampling_strategy == "group_by_length"
    padded_random, real_random = _padding(random_order)
    padded_bucketed, real_bucketed = _padding(bucketed)
    assert real_bucketed == real_random  # the same examples, in another order
    assert padded_bucketed < padded_random / 2, (padded_bucketed, padded_random)
    packed = _trainer(assets, tmp_path, cpu_profile(length_bucketing=True), packing=True)
    assert packed.args.train_sampling_strategy == "random"  # packed rows are full: nothing to bucket
