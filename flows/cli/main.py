"""`tunepipe`: the command line. Each module of this package adds its commands; they parse,
validate and hand over to the flows."""

from __future__ import annotations

import argparse
import os
import sys

from tunepipe.flows.cli import compare, info, operations, plan, registry, run, serve
from tunepipe.tasks.core.loading import ConfigError

COMMAND_MODULES = (run, plan, compare, info, operations, serve, registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description="Raw data to a served, fine-tuned LLM, one cached stage at a time.")
    parser.add_argument("--version", action="version", version=f"tunepipe {tunepipe_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def tunepipe_version() -> str:
    from tunepipe import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a reader that left early fails this flush, not the interpreter's
        return code
    except BrokenPipeError:
        # The reader went away (`tunepipe envs | head`): what is left to print has nowhere to go.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        print(f"tunepipe: config error\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a stage's own error is the message the user needs
        from tunepipe.tasks.core.stage import StageFailed

        if isinstance(exc, StageFailed):
            print(f"tunepipe: stage failed: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
