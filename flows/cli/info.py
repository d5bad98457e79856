"""`tunepipe envs` and `tunepipe config-reference`: what the bundled profiles and schemas offer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunepipe.tasks.core.environment import bundled_profiles, load_environment


def cmd_envs(args: argparse.Namespace) -> int:
    for name in bundled_profiles():
        env = load_environment(name)
        print(f"{name:<28} {env.device:<5} {env.dtype:<9} {env.launcher:<11} x{env.num_processes}  {env.description}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from tunepipe.tasks.core.config_reference import config_reference  # lazy: kept off `tunepipe` start-up

    text = config_reference()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_parsers(sub) -> None:
    envs = sub.add_parser("envs", help="list the bundled environment profiles")
    envs.set_defaults(func=cmd_envs)

    ref = sub.add_parser("config-reference", help="print the config reference generated from the schemas (markdown)")
    ref.add_argument("--output", "-o", help="write to this file instead of stdout")
    ref.set_defaults(func=cmd_config_reference)

