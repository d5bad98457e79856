"""A training stage proves its own result before it publishes.

Each check returns a result `{"passed": bool, ...what it measured}`; `require` turns a failed one
into a `StageFailed` whose message starts `self-check <name> failed:` so the log says which
check, and ends with the config switch that sets it to warn (`<stage>.self_checks.<name>: warn`):
a check can be wrong about a model it was not written for, and a user must be able to publish
anyway, knowingly. A warned check is logged and kept in the result as `warned`. The stages put
every result in their manifest's metrics under `checks`.

- `label_mask`: every row's loss covers exactly the assistant's answer (and its end-of-turn
  token), never the prompt; no row has a BOS the template did not render (some templates render
  BOS once per turn: SmolLM2's BOS is ChatML's `<|im_start|>`). Checked per row at encoding time
  (`encoding.label_mask_problem`: encoding imports the checks, never the other way round),
  by tokenizing the prompt on its own (independently of how the labels were computed).
- `steps`: the trainer ran every optimizer step it was asked for.
- `loss`: the loss is finite and moved.
- `adapter_effect`: base + saved adapter gives different outputs than the base on held-out
  prompts (an adapter that was never applied, or saved empty, changes nothing).
- `merged_matches_adapter` (export): the merged model and base + adapter agree on held-out prompts.
- `labels` (pretrain): every block the trainer trains on has labeled tokens.
- `reward_scores` (reward): the trained reward model scores the check pairs' chosen and rejected
  responses differently than the untrained one did (a model that never learned scores as before).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tunepipe.tasks.core.stage import StageFailed

IGNORE = -100


@dataclass(frozen=True)
class CheckPolicy:
    """What a failed self-check does in one stage: `fail` (the default) or `warn`, per check name, from
    the stage config's `self_checks` (`section` names the config section in messages)."""

    section: str
    actions: Mapping[str, str] = field(default_factory=dict)

    def action(self, name: str) -> str:
        return self.actions.get(name, "fail")

    def switch(self, name: str) -> str:
        return f"{self.section}.self_checks.{name}: warn"


def require(name: str, result: dict[str, Any], why: str, policy: CheckPolicy | None = None) -> dict[str, Any]:
    """A passed result as it is; a failed one fails the stage, or, where the policy says `warn`, is logged
    and returned marked `warned`."""
    if result["passed"]:
        return result
    if policy is not None and policy.action(name) == "warn":
        logging.getLogger(f"tunepipe.{policy.section}").warning("self-check %s failed (configured to warn): %s [%s]", name, why, policy.switch(name))
        return {**result, "warned": why}
    hint = f" (to publish anyway, set {policy.switch(name)})" if policy is not None else ""
    raise StageFailed(f"self-check {name} failed: {why}{hint}")


def warned_markdown(results: Mapping[str, Any], run: str | None = None) -> str:
    """Summary lines for the checks in `results` (name → result) that failed and were set to warn: an artifact
    published over a failed check says so where it is read, not only in a log line."""
    where = f", {run}" if run else ""
    return "".join(f"\n- **warning** (self-check {name}{where}, configured to warn): {r['warned']}"
                   for name, r in results.items() if isinstance(r, Mapping) and "warned" in r)


def steps_check(global_step: int, requested: int) -> dict[str, Any]:
    return {"passed": global_step >= requested, "global_step": int(global_step), "requested": int(requested)}


def loss_check(history: list[dict[str, float]], train_loss: float | None) -> dict[str, Any]:
    """Finite, and not constant (with at least two logged points)."""
    losses = [float(p["loss"]) for p in history]
    finite = all(math.isfinite(x) for x in losses) and (train_loss is None or math.isfinite(float(train_loss)))
    moved = len(losses) < 2 or max(losses) - min(losses) > 1e-6
    return {"passed": finite and moved, "finite": finite, "moved": moved, "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None}


def require_steps(who: str, global_step: int, trainer: Any, max_steps: int | None, policy: CheckPolicy | None = None) -> dict[str, Any]:
    """`steps`, enforced: every requested optimizer step ran (`who` opens the message: "pretrain", "the trainer").
    Requested: the stage's `training.max_steps`, else what the Trainer derived from the epochs."""
    requested = int(max_steps or trainer.state.max_steps)
    return require("steps", steps_check(global_step, requested), f"{who} ran {global_step} optimizer steps of the {requested} requested", policy)


def require_loss(
    subject: str, history: list[dict[str, float]], train_loss: float | None, advice: str = "", policy: CheckPolicy | None = None
) -> dict[str, Any]:
    """`loss`, enforced: finite and moved (`subject` names the loss in the message: "reward: the loss")."""
    loss = loss_check(history, train_loss)
    state = "not finite" if not loss["finite"] else "constant"
    return require("loss", loss, f"{subject} is {state} (first {loss['first']}, last {loss['last']}){advice}", policy)


def output_difference(a: Any, b: Any, batches: list[dict[str, Any]]) -> float:
    """Largest absolute difference of the two models' logits over the batches."""
    import torch

    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            la = a(**batch).logits.float()
            lb = b(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            worst = max(worst, float((la - lb).abs()[mask].max()))
    return worst


def adapter_effect_check(peft_model: Any, batches: list[dict[str, Any]], min_difference: float = 0.0) -> dict[str, Any]:
    """Base (adapter disabled) against base + adapter on held-out prompts: they must differ.

    Any difference passes: an adapter that was never applied, or whose up-projection is still
    zero, adds exact zeros, so its logits equal the base's bit for bit. A deliberately tiny
    update (learning rate 1e-9) still differs (~3e-7) and is not this check's business.
    """
    import torch

    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            on = peft_model(**batch).logits.float()
            with peft_model.disable_adapter():
                off = peft_model(**batch).logits.float()
            mask = batch["attention_mask"].bool()
            worst = max(worst, float((on - off).abs()[mask].max()))
    return {"passed": worst > min_difference, "max_logit_difference": worst, "prompts": sum(len(b["input_ids"]) for b in batches)}


def labels_present_check(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Every row of the collated batches has at least one labeled token (the loss has something to read)."""
    rows = empty = labeled = tokens = 0
    for batch in batches:
        for row in batch["labels"]:
            count = int((row != IGNORE).sum())
            rows, labeled, tokens, empty = rows + 1, labeled + count, tokens + int(row.numel()), empty + (count == 0)
    return {"passed": rows > 0 and empty == 0, "rows": rows, "empty_rows": empty, "labeled_tokens": labeled, "tokens": tokens}


def first_batches(trainer: Any, rows: int = 16) -> list[dict[str, Any]]:
    """The trainer's collator applied to its first training rows, in per-device batches (no sampler:
    the check draws nothing from the training run's random streams)."""
    dataset = trainer.train_dataset
    n, size = min(rows, len(dataset)), max(1, int(trainer.args.per_device_train_batch_size))
    return [trainer.data_collator([dataset[i] for i in range(start, min(start + size, n))]) for start in range(0, n, size)]


def reward_scores_check(before: tuple[list[float], list[float]], after: tuple[list[float], list[float]], on: str) -> dict[str, Any]:
    """The trained reward model's (chosen, rejected) scores against the untrained one's on the same pairs: they must
    differ. With held-out pairs (`on`="heldout") the accuracy before and after is reported beside it."""
    old, new = [*before[0], *before[1]], [*after[0], *after[1]]
    change = max((abs(a - b) for a, b in zip(old, new)), default=0.0)

    def accuracy(chosen: list[float], rejected: list[float]) -> float | None:
        return round(sum(c > r for c, r in zip(chosen, rejected)) / len(chosen), 4) if chosen else None

    return {"passed": bool(old) and change > 0, "max_score_change": change, "pairs": len(before[0]), "on": on,
            "accuracy_before": accuracy(*before), "accuracy_after": accuracy(*after)}
# --------------------------------------------------------------------------------------------
# Reward-driven alignment (ppo, grpo, rloo): a run that learned nothing must not publish quietly.


def reward_variance_check(zero_std_fractions: list[float], max_fraction: float) -> dict[str, Any]:
    """The mean share of groups whose samples all earned the same reward (TRL's
    `frac_reward_zero_std` per step) must not exceed `max_fraction`: such groups have zero
    advantage, so they give the policy no gradient at all."""
    mean = sum(zero_std_fractions) / len(zero_std_fractions) if zero_std_fractions else None
    return {
        "passed": mean is None or mean <= max_fraction,
        "mean_zero_std_fraction": None if mean is None else round(mean, 4),
        "max_allowed": max_fraction,
        "steps": len(zero_std_fractions),
    }


def reward_moved_check(reward_means: list[float], min_range: float) -> dict[str, Any]:
    """The per-step mean reward must span more than `min_range` over the run (max - min)."""
    if not reward_means:
        return {"passed": True, "steps": 0}
    low, high = min(reward_means), max(reward_means)
    return {
        "passed": len(reward_means) < 2 or high - low > min_range,
        "first": reward_means[0], "last": reward_means[-1], "min": low, "max": high,
        "min_range": min_range, "steps": len(reward_means),
    }


def trainable_snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of every trainable tensor (the adapter being aligned), to compare after training."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad and p.numel()}


def parameters_changed_check(before: dict[str, Any], model: Any) -> dict[str, Any]:
    """The trained tensors must differ from their state before training (for a continued adapter:
    the SFT adapter). Any difference passes; an optimizer that got only zero gradients (every
    advantage zero) leaves them equal bit for bit."""
    after = dict(model.named_parameters())
    changed, worst = 0, 0.0
    for name, old in before.items():
        new = after[name].detach().to("cpu")
        difference = float((new.float() - old.float()).abs().max()) if new.shape == old.shape else float("inf")
        changed += difference > 0
        worst = max(worst, difference)
    return {"passed": changed > 0, "tensors_changed": changed, "tensors": len(before), "max_abs_change": worst}
