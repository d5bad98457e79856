"""`tunepipe`: the command line. Each module of this package adds its commands; they parse,
validate and hand over to the flows."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from tunepipe import __version__
from tunepipe.flows.cli import compare, info, operations, plan, registry, run, serve
from tunepipe.tasks.core.loading import ConfigError

COMMAND_MODULES = (run, plan, compare, info, operations, serve, registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description="Raw data to a served, fine-tuned LLM, one cached stage at a time.")
    parser.add_argument("--version", action="version", version=f"tunepipe {tunepipe_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure (a config error, a failed stage, an unwritable path)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def tunepipe_version() -> str:
    return __version__


# A path the run cannot write (a read-only or full disk, no permission): the path is the message.
UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("TUNEPIPE_DEBUG") == "1"
    if debug:
        os.environ["TUNEPIPE_DEBUG"] = "1"  # stage processes and Prefect's logs keep their tracebacks too
    else:
        from tunepipe.tasks.core.stage import quiet_expected_failures  # lazy: kept off `tunepipe` start-up

        quiet_expected_failures()
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
        _traceback(debug)
        print(f"tunepipe: config error\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a stage's own error is the message the user needs
        from tunepipe.tasks.core.stage import StageFailed  # lazy: kept off `tunepipe` start-up

        if isinstance(exc, StageFailed):
            _traceback(debug)
            print(f"tunepipe: stage failed: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE and exc.filename:
            _traceback(debug)
            print(f"tunepipe: cannot write {exc.filename}: {exc.strerror}; the workdir must be writable: fix its "
                  "permissions or choose another (--workdir DIR)", file=sys.stderr)
            return 1
        raise


def _traceback(debug: bool) -> None:
    if debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
