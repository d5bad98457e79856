"""What every command shares: the config arguments and loading, and the Prefect API address."""

from __future__ import annotations

import argparse
import os

from tunepipe.tasks.core.config import load_pipeline_config

DEFAULT_QUICKSTART_WORKDIR = "runs/quickstart"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="pipeline YAML (default: the bundled quickstart)")
    parser.add_argument("--env", help="environment profile (bundled name or YAML path), overriding the config's")
    parser.add_argument("--workdir", help="working directory, overriding the config's")


def load_config(args: argparse.Namespace):
    workdir = args.workdir
    if args.config is None and workdir is None:
        workdir = DEFAULT_QUICKSTART_WORKDIR  # the bundled quickstart writes under the CWD, not the package
    return load_pipeline_config(args.config, workdir=workdir, environment=args.env)


def api_url_of(args: argparse.Namespace) -> str:
    from tunepipe.tasks.ops.prefect_server import api_url  # lazy: kept off `tunepipe` start-up

    return args.api_url or os.environ.get("PREFECT_API_URL") or api_url()


def use_api(url: str) -> None:
    """Point this process's Prefect client at `url`: set before Prefect is first imported."""
    os.environ["PREFECT_API_URL"] = url


def interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler: a service manager's stop is a Ctrl-C too."""
    raise KeyboardInterrupt
