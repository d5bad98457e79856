"""`tunepipe plan`: parameter counts and peak training memory per device for each profile, from the model config alone."""

from __future__ import annotations

import argparse
import json

from tunepipe.flows.cli.common import add_config_args, load_config
from tunepipe.tasks.core.environment import bundled_profiles, load_environment
from tunepipe.tasks.core.loading import ConfigError


def cmd_plan(args: argparse.Namespace) -> int:
    from tunepipe.schemas.sft import SFTConfig  # lazy: kept off `tunepipe` start-up
    # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.training.memory_plan import advice, pipeline_plan_target, plan

    if args.model:
        method = {"name": args.method}
        if args.lora_r is not None:
            method["r"] = args.lora_r
        if args.lora_alpha is not None:
            method["alpha"] = args.lora_alpha
        if args.target_parameters:
            method["target_parameters"] = args.target_parameters
            method["dropout"] = 0.0  # parameter LoRA has none; counts do not depend on it
        if args.target_modules:
            method["target_modules"] = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
        try:
            sft = SFTConfig(model=args.model, method=method, max_length=args.seq_len or 512)
        except ValueError as exc:
            raise ConfigError(f"plan: {exc}") from None
        model, method_config, seq_len, training, env_name = sft.model, sft.method, sft.max_length, sft.training, args.env or "cpu"
        packing = args.packing
    else:
        config = load_config(args)
        try:
            model, method_config, seq_len, training = pipeline_plan_target(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Reward trains its own method; DPO trains the SFT adapter further: each at its own section's max_length.
        section = {"reward": config.reward, "dpo": config.align}.get(args.stage)
        if section is not None:
            seq_len = section.max_length
            method_config = section.method if args.stage == "reward" else method_config
        seq_len = args.seq_len or seq_len
        env_name = config.environment
        packing = args.packing or config.sft.packing
    stage = args.stage
    result = plan(model, method_config, load_environment(env_name), seq_len, training, packing=packing, stage=stage)
    profiles = {name: load_environment(name) for name in bundled_profiles()}
    result["profiles"] = [
        {"environment": name, "total_gb": row["memory"]["total_gb"], "fits": row["memory"]["fits"],
         "processes": row["memory"]["assumptions"]["processes"], "sharding": row["memory"]["assumptions"]["sharding"]}
        for name, profile in profiles.items()
        for row in [plan(model, method_config, profile, seq_len, training, packing=packing, stage=stage)]
    ]
    result["advice"] = advice(result["total_params"], args.host or host_device(), env_name, profiles)
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(f"{result['method']}: {result['trainable_params']:,} trainable of {result['total_params']:,} parameters "
          f"({result['trainable_percent']}%), seq_len {seq_len}")
    if result["experts"]:
        print(f"mixture of experts: {result['experts']['active_per_token']} of {result['experts']['per_block']} experts per token, "
              f"{result['active_params']:,} of {result['total_params']:,} parameters active")
    # Per device: each process of a multi-GPU profile holds its share of the sharded state plus its own activations.
    print(f"{'profile':<38} {'processes':>9}  {'sharding':<70} {'GiB/device':>10}  fits")
    for row in result["profiles"]:
        print(f"{row['environment']:<38} {row['processes']:>9}  {sharding_label(row['sharding']):<70} {row['total_gb']:>10.2f}  "
              f"{'yes' if row['fits'] else 'NO'}")
    print(advice_line(result["advice"], {row["environment"]: row["total_gb"] for row in result["profiles"]}, stage))
    return 0


def host_device() -> str:
    """The device this machine trains on: cuda when torch sees a GPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def advice_line(advised: dict, totals: dict[str, float], stage: str) -> str:
    """`advice: on this cpu host use profile cpu-small-lm (sized for ...): ~1.6 GiB for sft`."""
    if advised["profile"] is None:
        return f"advice: {advised['reason']}"
    name = advised["profile"]
    current = " (the profile planned above)" if advised["is_current"] else ""
    return (f"advice: on this {advised['host']} host use profile {name}{current}, {advised['reason']}: "
            f"~{totals[name]:.2f} GiB for {stage}")


def sharding_label(shards: dict) -> str:
    """`zero-3 /8: weights, gradients, optimizer; on cpu: optimizer, weights`: what each device holds a share of."""
    label = shards["scheme"]
    if shards["divided"]:
        label += f" /{shards['world_size']}: {', '.join(shards['divided'])}"
    if shards["offloaded"]:
        label += f"; on cpu: {', '.join(shards['offloaded'])}"
    return label


def add_parsers(sub) -> None:
    plan = sub.add_parser("plan", help="parameter counts and peak training memory per profile, from the model config alone")
    add_config_args(plan)
    plan.add_argument("--model", help="hub id or local path: plan this model instead of a pipeline's sft stage")
    plan.add_argument("--method", default="lora", help="fine-tuning method (with --model)")
    plan.add_argument("--lora-r", type=int, help="LoRA rank (with --model)")
    plan.add_argument("--lora-alpha", type=int, help="LoRA alpha (with --model)")
    plan.add_argument("--target-modules", nargs="+", help="modules to adapt, or all-linear (with --model)")
    plan.add_argument("--target-parameters", nargs="+", help="parameters to adapt, e.g. a MoE model's mlp.experts.gate_up_proj (with --model)")
    plan.add_argument("--seq-len", type=int, help="sequence length (default: the stage's max_length, or 512)")
    plan.add_argument("--packing", action="store_true", help="plan packed, padding-free rows (default: the stage's packing)")
    plan.add_argument("--stage", choices=["sft", "reward", "dpo"], default="sft",
                      help="what trains: sft (a causal LM on rows), reward (a classifier on chosen + rejected rows) or "
                      "dpo (the policy on chosen + rejected rows, with its reference)")
    plan.add_argument("--host", choices=["cpu", "cuda"], help="device of the machine the advice is for (default: this one's)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

