"""`tunepipe registry`: list, show, promote and roll back adapter versions.

    tunepipe registry [--root ROOT | -c CONFIG] list [NAME] [--json]
    tunepipe registry ... show REF                     # notes, notes@3, notes@prod
    tunepipe registry ... promote NAME VERSION [--alias prod] [--server URL] [--api-key-env VAR]
    tunepipe registry ... rollback NAME [--alias prod] [--server URL] [--api-key-env VAR]

The root is `--root`, else the config's `deploy.registry`, else `<workdir>/registry` of the config
(default: the bundled quickstart's). With `--server`, promote and rollback also hot-swap the
adapter in that running server (the same unload + load the deploy stage does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from tunepipe.tasks.core.config import load_pipeline_config


def add_parsers(subparsers) -> argparse.ArgumentParser:
    registry = subparsers.add_parser("registry", help="list, promote and roll back versions in the adapter registry")
    registry.add_argument("--root", help="registry directory or fsspec URI (default: from the pipeline config)")
    registry.add_argument("--config", "-c", help="pipeline YAML whose registry to use (default: the bundled quickstart)")
    sub = registry.add_subparsers(dest="registry_command", required=True)

    listing = sub.add_parser("list", help="adapters, versions and aliases")
    listing.add_argument("name", nargs="?", help="only this adapter")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=_guarded(cmd_list))

    show = sub.add_parser("show", help="one version: path, base, lineage (REF: name, name@3, name@prod)")
    show.add_argument("ref")
    show.set_defaults(func=_guarded(cmd_show))

    for verb, helptext in (("promote", "point an alias at a version"), ("rollback", "point an alias back at its previous version")):
        cmd = sub.add_parser(verb, help=helptext)
        cmd.add_argument("name")
        if verb == "promote":
            cmd.add_argument("version", type=int)
        cmd.add_argument("--alias", default="prod", help="alias to move (default prod)")
        cmd.add_argument("--server", help="also hot-swap the adapter in this running server (http://host:port)")
        cmd.add_argument("--api-key-env", help="environment variable with the server's API key")
        cmd.add_argument("--timeout", type=float, default=60.0, help="server request timeout in seconds")
        cmd.set_defaults(func=_guarded(cmd_promote if verb == "promote" else cmd_rollback))
    return registry


def _guarded(command):
    """A registry or server error is the message the user needs, not a traceback (exit code 1)."""

    def run(args: argparse.Namespace) -> int:
        from tunepipe.tasks.deploy.stage import DeployError  # lazy: kept off `tunepipe` start-up
        from tunepipe.tasks.core.registry import RegistryError  # lazy: kept off `tunepipe` start-up

        try:
            return command(args)
        except (RegistryError, DeployError) as exc:
            print(f"tunepipe registry: {exc}", file=sys.stderr)
            return 1

    return run


def registry_root(args: argparse.Namespace) -> str:
    if args.root:
        return args.root

    workdir = None if args.config else "runs/quickstart"
    config = load_pipeline_config(args.config, workdir=workdir)
    deploy = getattr(config, "deploy", None)
    if deploy is not None and deploy.registry:
        return deploy.registry
    return os.path.join(config.workdir, "registry")


def _registry(args: argparse.Namespace):
    from tunepipe.tasks.core.registry import AdapterRegistry  # lazy: kept off `tunepipe` start-up

    return AdapterRegistry(registry_root(args))


def cmd_list(args: argparse.Namespace) -> int:
    records = _registry(args).list()
    if args.name:
        records = {args.name: records[args.name]} if args.name in records else {}
    if args.json:
        print(json.dumps({name: r.model_dump(mode="json") for name, r in records.items()}))
        return 0
    if not records:
        print("no adapters registered")
    for name, record in records.items():
        by_version: dict[int, list[str]] = {}
        for alias, version in record.aliases.items():
            by_version.setdefault(version, []).append(alias)
        print(name)
        for entry in record.versions:
            aliases = ",".join(sorted(by_version.get(entry.version, [])))
            print(f"  {entry.version:>4}  {aliases:<12} {entry.registered_at}  data {entry.lineage.data_key or '-'}  {entry.lineage.source or '-'}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).resolve(args.ref).model_dump(mode="json"), indent=1))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    previous = registry.promote(args.name, args.version, args.alias, reason="tunepipe registry promote")
    print(f"{args.name}@{args.alias}: version {args.version} (was {previous})")
    _hot_swap(args, registry, registry.resolve(f"{args.name}@{args.version}"))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.rollback(args.name, args.alias, reason="tunepipe registry rollback")
    print(f"{args.name}@{args.alias}: back to version {entry.version}")
    _hot_swap(args, registry, entry)
    return 0


def _hot_swap(args: argparse.Namespace, registry: Any, entry: Any) -> None:
    if not args.server:
        return
    from tunepipe.tasks.lm.server_client import ServerClient  # lazy: kept off `tunepipe` start-up

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    ServerClient(args.server.rstrip("/"), key, args.timeout).swap(entry.name, registry.local_path(entry))
    print(f"{args.server}: now serves {entry.name} = version {entry.version}")
