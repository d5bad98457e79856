"""`tunepipe run` and `tunepipe validate`: the pipeline on a config."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from pydantic import ValidationError

from tunepipe.flows.cli.common import add_config_args, load_config
from tunepipe.tasks.core.loading import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args)
    selection = stage_selection(config, args)  # before any work: a mistyped stage name is a config error
    # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.core.runtime import configure_runtime, owned_prefect_server

    configure_runtime(config.workdir)
    from tunepipe.tasks.core.runtime import configure_console  # lazy: kept off `tunepipe` start-up

    configure_console(args.verbose)
    # Prefect is imported only now, after configure_runtime has set its environment.
    from tunepipe.flows.pipeline import pipeline

    from prefect.exceptions import TerminationSignal

    with owned_prefect_server(), _stdout_to_stderr(args.json):
        try:
            summary = pipeline(config=config, selection=selection)
        except (KeyboardInterrupt, TerminationSignal) as exc:
            # Ctrl-C or SIGTERM: Prefect has marked the flow run crashed; staging is kept for resume.
            code = 130 if isinstance(exc, KeyboardInterrupt) else 128 + exc.signal
            print("tunepipe: run interrupted; the same command resumes it (cached stages reused, training from its "
                  "last checkpoint)", file=sys.stderr)
            return code
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return 0


@contextlib.contextmanager
def _stdout_to_stderr(active: bool):
    """With --json, stdout holds exactly one JSON document: while the run works, everything else
    written to stdout (the trainers' step dicts, library warnings printed from C, a launched
    worker's output) goes to stderr, at the file-descriptor level so that no writer escapes."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def stage_selection(config, args: argparse.Namespace):
    from tunepipe.tasks.core.selection import StageSelection  # lazy: kept off `tunepipe` start-up

    try:
        return StageSelection(stages=config.stages(), until=args.until, from_stage=args.from_stage)
    except ValidationError as exc:
        raise ConfigError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


def _print_summary(summary: dict) -> None:
    print(f"run {summary['run_id']}  workdir {summary['workdir']}")
    for name, stage in summary["stages"].items():
        print(f"  {name:<12} {stage['key']}  {'cached' if stage['cached'] else 'computed'}  {stage['path']}")


def cmd_validate(args: argparse.Namespace) -> int:
    config = load_config(args)
    print(f"{config.name}: valid; stages {', '.join(config.stages())}; environment {config.environment}; workdir {config.workdir}")
    return 0


def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    add_config_args(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="recompute this stage and all after it")
    run.add_argument("--json", action="store_true", help="print the run summary as one JSON object on the last line")
    run.add_argument("--verbose", action="store_true",
                     help="the libraries' own console output: the Trainer's per-step dicts and bars, load reports, warnings")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline config without running anything")
    add_config_args(validate)
    validate.set_defaults(func=cmd_validate)

