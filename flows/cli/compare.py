"""`tunepipe compare-methods`: train a set of fine-tuning methods on the same data, budget and seed
and print the measured comparison (tasks/ops/compare_methods.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tunepipe.flows.cli.common import add_config_args, load_config
from tunepipe.tasks.core.loading import ConfigError

DEFAULT_METHODS = ["full", "lora", "lora_plus", "adapter", "mam_adapter", "unipelt", "p_tuning_v2", "ia3", "galore"]


def parse_method(text: str) -> object:
    """`lora` or a JSON object such as `{"name": "adapter", "placement": "parallel"}`."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"compare-methods: --methods {text!r} is not valid JSON: {exc}") from None
    return text


def cmd_compare(args: argparse.Namespace) -> int:
    # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.ops.compare_methods import compare_methods, markdown_table, sft_variant

    config = load_config(args)
    if config.sft is None:
        raise ConfigError(f"{config.name}: compare-methods needs a pipeline with an sft section")
    specs = [parse_method(m) for m in args.methods]
    for spec in specs:  # every method checked before anything trains
        try:
            sft_variant(config, spec if isinstance(spec, dict) else {"name": spec}, args.max_steps, args.heldout_examples)
        except ValueError as exc:
            raise ConfigError(f"compare-methods: method {spec!r}: {exc}") from None
    rows = compare_methods(config, specs, max_steps=args.max_steps, heldout_examples=args.heldout_examples,
                           latency_prompts=args.latency_prompts, latency_tokens=args.latency_tokens)
    table = markdown_table(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(rows, indent=1))
        (out / "comparison.md").write_text(table + "\n")
    print(json.dumps(rows) if args.json else table)
    return 0


def add_parsers(sub) -> None:
    compare = sub.add_parser(
        "compare-methods", help="train several fine-tuning methods on the same data, budget and seed; print the measured comparison"
    )
    add_config_args(compare)
    compare.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                         help="method names or JSON method objects (default: %(default)s)")
    compare.add_argument("--max-steps", type=int, help="optimizer steps per method (default: the sft section's budget)")
    compare.add_argument("--heldout-examples", type=int, help="held-out test records per task (default: the sft section's)")
    compare.add_argument("--latency-prompts", type=int, default=4, help="test prompts timed for the latency column")
    compare.add_argument("--latency-tokens", type=int, default=16, help="tokens decoded per timed prompt")
    compare.add_argument("--out", help="directory for comparison.json and comparison.md")
    compare.add_argument("--json", action="store_true", help="print the rows as one JSON array")
    compare.set_defaults(func=cmd_compare)
