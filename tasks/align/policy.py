"""The policy being aligned, and the frozen reference it is held to.

An SFT adapter is trained further, not stacked under a second one: the result is one adapter per
task that `PeftModel.from_pretrained(base, dir)` loads on the very base the SFT adapter used,
so serving stays one adapter per task. A full-model SFT result gets a fresh LoRA adapter
(`align.lora`) on top of it, whose base is then that SFT model.

The reference is the SFT policy: for a continued adapter, a frozen copy of the SFT adapter under
the name `ref` (what TRL's DPO, KTO, GRPO and RLOO trainers make themselves for a PeftModel; PPO
is given the same through `ref_adapter_name`); for a fresh adapter, the same weights with the
adapter disabled. Either way the base weights exist once. Disabling the continued adapter instead
would make the pre-SFT base the reference, and the KL term would pull the policy back out of SFT.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.schemas.methods import MethodConfig, QLoraMethod
from tunepipe.tasks.align.job import AlignJob
from tunepipe.tasks.core.stage import StageFailed
from tunepipe.tasks.lm.modeling import load_tokenizer
from tunepipe.tasks.training.moe import apply_router
from tunepipe.tasks.training.peft_methods import lora_config
from tunepipe.tasks.training.trainer import load_base

REF_ADAPTER = "ref"


def load_policy(job: AlignJob) -> tuple[Any, Any]:
    """(trainable PeftModel, tokenizer) of one align run; the SFT adapter is the `default` adapter.
    A MoE policy trains with its router's load-balancing loss (`training.router`)."""
    method = job.sft_method
    tokenizer = load_tokenizer(job.sft_dir)
    model, tokenizer = _load_policy(job, method, tokenizer)
    apply_router(model, job.config.training.router)
    return model, tokenizer


def _load_policy(job: AlignJob, method: Any, tokenizer: Any) -> tuple[Any, Any]:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if job.sft_kind == "model":
        model = load_base(job.sft_dir, method, job.env)
        return get_peft_model(model, lora_config(job.config.lora)), tokenizer
    model = load_base(job.base_model, method, job.env)
    if isinstance(method, QLoraMethod):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.env.gradient_checkpointing)
    if not method.is_peft:
        raise StageFailed(f"align: the sft artifact's method {method.name} saved no adapter")
    return PeftModel.from_pretrained(model, job.sft_dir, is_trainable=True), tokenizer


def add_reference_adapter(model: Any) -> None:
    """A frozen copy of the `default` adapter under `ref` (the SFT policy, for PPO's KL term)."""
    model.add_adapter(REF_ADAPTER, model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", f".{REF_ADAPTER}.")).data.copy_(param.data)
    model.set_adapter("default")


def save_policy(model: Any, tokenizer: Any, dest: Path) -> None:
    """The trained `default` adapter only (not the reference copy), with the tokenizer, atomically."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, selected_adapters=["default"])
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)


class PolicyPair:
    """The SFT policy and the aligned policy on one loaded base, switched by adapter name."""

    def __init__(self, base_model: str, sft_dir: str, aligned_dir: str, sft_kind: str, method: MethodConfig, env: EnvironmentProfile):
        from peft import PeftModel

        if sft_kind == "model":
            base = load_base(sft_dir, method, env)
            self.model = PeftModel.from_pretrained(base, aligned_dir, adapter_name="aligned").eval()
            self._sft_adapter = None
        else:
            base = load_base(base_model, method, env)
            self.model = PeftModel.from_pretrained(base, sft_dir, adapter_name="sft").eval()
            self.model.load_adapter(aligned_dir, adapter_name="aligned")
            self._sft_adapter = "sft"
        self.model.config.use_cache = True

    def use(self, which: str) -> Any:
        """A context in which `self.model` is the `sft` or the `aligned` policy."""
        @contextmanager
        def adapter(name: str):
            self.model.set_adapter(name)
            yield self.model

        if which == "aligned":
            return adapter("aligned")
        if self._sft_adapter is None:
            @contextmanager
            def disabled():
                self.model.set_adapter("aligned")
                with self.model.disable_adapter():
                    yield self.model

            return disabled()
        return adapter(self._sft_adapter) if self._sft_adapter else nullcontext(self.model)
