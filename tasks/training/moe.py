"""Mixture-of-Experts models in training: the router's load-balancing loss and the expert counts.

A MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) replaces the FFN with a router and `E` experts
of which `k` run per token. transformers adds the router's auxiliary (load-balancing) loss to the
LM loss, weighted by `router_aux_loss_coef`, only when `output_router_logits` is on; it is off in
the models' configs by default, so fine-tuning would let the router collapse onto few experts.
`apply_router` turns it on from `training.router`; `router_loss_callback` records its value per logged
step as `router_aux_loss` (the Trainer logs only the summed loss).

The experts of transformers 5 models are fused 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), not `nn.Linear`s: LoRA reaches them through PEFT's `target_parameters`.
"""

from __future__ import annotations

from typing import Any

ROUTER_STEP_METRICS = {"router_aux_loss": "router_aux_loss"}  # log key -> metric name
# Config attribute names of (experts per block, experts per token, shared-expert width).
_EXPERT_COUNT = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "top_k")


def text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def experts(config: Any) -> tuple[int, int] | None:
    """(experts per MoE block, experts active per token), or None for a dense model."""
    cfg = text_config(config)
    total = next((getattr(cfg, a) for a in _EXPERT_COUNT if getattr(cfg, a, None)), None)
    top_k = next((getattr(cfg, a) for a in _TOP_K if getattr(cfg, a, None)), None)
    if not total or not top_k or total <= 1:
        return None
    return int(total), int(top_k)


def is_moe(config: Any) -> bool:
    return experts(config) is not None


def apply_router(model: Any, router: Any) -> None:
    """Set the router-loss switches of a MoE model's config (`router`: schemas.training.RouterConfig)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_moe(base.config):
        return
    for cfg in {id(base.config): base.config, id(text_config(base.config)): text_config(base.config)}.values():
        cfg.output_router_logits = router.output_router_logits
        if router.router_aux_loss_coef is not None:
            cfg.router_aux_loss_coef = router.router_aux_loss_coef


def router_loss_weight(model: Any) -> float:
    """The load-balancing loss weight a trainer computing its own loss must add (TRL's DPO):
    the config's coefficient with `output_router_logits` on, else 0."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = text_config(base.config)
    if not is_moe(base.config) or not getattr(cfg, "output_router_logits", False):
        return 0.0
    return float(getattr(cfg, "router_aux_loss_coef", 0.0) or 0.0)


def expert_parameters(model: Any) -> int:
    """Parameters inside routed experts (not the router, not a shared expert)."""
    return sum(p.numel() for name, p in model.named_parameters() if ".experts." in name and "lora_" not in name)


def active_parameters(model: Any, total: int) -> int:
    """Parameters one token runs through: everything but the idle experts' share."""
    counts = experts(model.config)
    if counts is None:
        return total
    n_experts, top_k = counts
    return int(total - expert_parameters(model) * (n_experts - top_k) / n_experts)


def router_loss_callback(model: Any) -> Any | None:
    """A TrainerCallback adding the mean router aux loss since the last log to that log entry
    (`router_aux_loss`); None for a dense model or with the router loss off."""
    from transformers import TrainerCallback

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_moe(base.config) or not getattr(text_config(base.config), "output_router_logits", False):
        return None
    return _router_loss_log(base, TrainerCallback)


def _router_loss_log(base: Any, callback_cls: Any) -> Any:
    """The callback class around a forward hook on the causal LM that collects `outputs.aux_loss`."""
    import torch

    seen: list[float] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        aux = getattr(output, "aux_loss", None)
        # Training forwards only: not DPO's reference pass, generation or evaluation (no grad).
        if aux is not None and module.training and torch.is_grad_enabled():
            seen.append(float(aux.detach()))

    base.register_forward_hook(hook)

    class _RouterLossLog(callback_cls):
        def on_log(self, args, state, control, logs=None, **kwargs):
            # Trainer.log appended this entry to log_history just before calling on_log.
            if seen and state.log_history and "loss" in state.log_history[-1]:
                state.log_history[-1]["router_aux_loss"] = round(sum(seen) / len(seen), 6)
                seen.clear()

    return _RouterLossLog()
