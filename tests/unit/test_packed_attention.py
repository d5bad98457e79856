"""Packed (padding-free) attention: a packed row computes what its examples compute alone, for every
attention kernel that runs on a CPU, and the trainer's real batches reach the model padding-free, so
one example can never see another.

flash-attn needs CUDA; its varlen path gets the same position_ids (checked on a device by
benchmarks/gpu_sft.py, whose packed runs use the profile's `packed_attention`).
"""

from __future__ import annotations

import pytest
import torch

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.sft import SFTConfig
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm import modeling
from tunepipe.tasks.lm.encoding import IGNORE
from tests.helpers.training import build_tiny_model, cpu_profile, write_data_artifact

torch.set_num_threads(1)

LENGTHS = (9, 14, 5)  # three examples of different lengths in one packed row


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    return {"model": build_tiny_model(root / "llama"), "data": write_data_artifact(root / "data")}


def _model(path, kernel: str):
    model = modeling.load_model(path, dtype="float32", attn_implementation=kernel)
    model.config.use_cache = False
    return model.eval()


def _examples(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=generator) for n in LENGTHS]


def _packed(examples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One padding-free row as TRL's collator builds it: ids and positions concatenated, no attention mask,
    and no label on an example's first token (nothing before it in its own example predicts it)."""
    ids = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    labels = ids.clone()
    labels[positions == 0] = IGNORE
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def _packed_vs_alone(model, examples):
    """(packed logits, logits of each example alone concatenated, packed loss, loss of the examples alone)."""
    packed = model(**_packed(examples), use_cache=False)
    alone = [model(input_ids=e[None], labels=e[None], use_cache=False) for e in examples]
    # HF's loss is the mean over labelled positions: the packed loss is the token-weighted mean of the losses alone.
    counts = [len(e) - 1 for e in examples]
    loss_alone = sum(out.loss * n for out, n in zip(alone, counts)) / sum(counts)
    return packed.logits, torch.cat([out.logits for out in alone], dim=1), packed.loss, loss_alone


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_row_equals_examples_alone_logits_loss_and_gradients(assets, kernel):
    model = _model(assets["model"], kernel)
    examples = _examples(model.config.vocab_size)
    packed_logits, alone_logits, packed_loss, loss_alone = _packed_vs_alone(model, examples)
    torch.testing.assert_close(packed_logits, alone_logits, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(packed_loss, loss_alone, atol=1e-6, rtol=1e-6)
    # Training sees the same thing: the gradients of the packed loss are those of the examples' losses.
    params = [p for p in model.parameters() if p.requires_grad]
    grads_packed = torch.autograd.grad(packed_loss, params)
    grads_alone = torch.autograd.grad(loss_alone, params)
    for g_packed, g_alone in zip(grads_packed, grads_alone):
        torch.testing.assert_close(g_packed, g_alone, atol=1e-6, rtol=1e-4)


def test_packed_row_equals_examples_alone_with_flex_attention(assets):
    """flex_attention with transformers' document mask (forward only: PyTorch has no CPU backward for it;
    the profile validator keeps it out of CPU training). Compiles flex_attention once (~20 s on 2 cores)."""
    if not modeling.attention_installed("flex_attention"):
        pytest.skip("this torch has no flex_attention")
    model = _model(assets["model"], "flex_attention")
    with torch.no_grad():
        packed_logits, alone_logits, packed_loss, loss_alone = _packed_vs_alone(model, _examples(model.config.vocab_size))
    torch.testing.assert_close(packed_logits, alone_logits, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(packed_loss, loss_alone, atol=1e-6, rtol=1e-6)


def test_a_trainer_batch_is_padding_free_and_examples_cannot_see_each_other(assets, tmp_path):
    """The real sft trainer's collator: one flattened row, restarting position_ids, no attention mask. Changing
    one example's tokens leaves every other example's logits exactly as they were."""
    from tunepipe.tasks.sft.train import sft_trainer

    env = cpu_profile(packed_attention=["eager"])  # the profile picks the packed kernel
    config = {"model": str(assets["model"]), "method": {"name": "lora", "r": 4}, "max_length": 128, "packing": True,
              "training": {"max_steps": 1, "warmup_ratio": 0.0}}
    job = {"config": SFTConfig.model_validate(config).model_dump(mode="json"), "env": env.model_dump(mode="json"),
           "model_path": str(assets["model"]), "data_dir": assets["data"].path, "tasks": None,
           "output_dir": str(tmp_path), "save_to": "out", "checkpoint_dir": str(tmp_path / "ckpt")}
    trainer, _ = sft_trainer(job)
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.args.padding_free
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3, "the row should hold several examples"
    bounds = list(zip(starts, starts[1:] + [batch["input_ids"].shape[1]]))
    model = trainer.model.eval()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        changed = batch["input_ids"].clone()
        lo, hi = bounds[1]
        changed[0, lo:hi] = (changed[0, lo:hi] + 7) % model.config.vocab_size
        after = model(input_ids=changed, position_ids=batch["position_ids"], use_cache=False).logits[0]
    for i, (a, b) in enumerate(bounds):
        if i == 1:
            assert (after[a:b] - before[a:b]).abs().max() > 1e-3  # the changed example does change
        else:
            assert torch.equal(after[a:b], before[a:b]), f"example {i} saw the change in example 1"


def test_training_attention_follows_the_profile_preferences(monkeypatch):
    installed = {"flash_attention_2": False, "flex_attention": True}
    monkeypatch.setattr(modeling, "attention_installed", lambda kernel: installed.get(kernel, kernel in ("eager", "sdpa")))
    prefs = ["flash_attention_2", "flex_attention"]
    assert modeling.training_attention("sdpa", prefs, padding_free=True) == "flex_attention"
    assert modeling.training_attention("sdpa", prefs, padding_free=False) == "sdpa"  # unpacked rows keep the base kernel
    assert modeling.training_attention("sdpa", [], padding_free=True) == "sdpa"
    installed["flash_attention_2"] = True
    assert modeling.training_attention("sdpa", prefs, padding_free=True) == "flash_attention_2"
    installed.update(flash_attention_2=False, flex_attention=False)
    with pytest.raises(StageFailed, match="none of these attention kernels is installed"):
        modeling.training_attention("sdpa", prefs, padding_free=True)


def test_padding_free_means_best_fit_packing_only():
    from tunepipe.tasks.training.peft_methods import is_padding_free

    assert is_padding_free(True) and is_padding_free("bfd") and is_padding_free("bfd_split")
    assert not is_padding_free(False) and not is_padding_free("wrapped")


def test_a_cpu_profile_cannot_train_with_flash_or_flex_attention():
    base = cpu_profile().model_dump()
    for kernel, message in (("flex_attention", "no CPU backward"), ("flash_attention_2", "needs a CUDA device")):
        with pytest.raises(ValueError, match=message):
            EnvironmentProfile.model_validate({**base, "packed_attention": [kernel]})
    gpu = {**base, "device": "cuda", "packed_attention": ["flash_attention_2", "flex_attention"]}
    assert EnvironmentProfile.model_validate(gpu).packed_attention == ["flash_attention_2", "flex_attention"]
