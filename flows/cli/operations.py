"""Operations: `tunepipe up` (a local Prefect server and workers), `tunepipe deployments` (the
retrain flow's Prefect deployments), `tunepipe watch` (data drops → data versions) and `tunepipe
join` (a cluster node joining the multi-node training jobs another node's stages post)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from tunepipe.flows.cli.common import (
    add_config_args,
    api_url_of,
    interrupt,
    load_config,
    use_api,
)
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.loading import ConfigError


def cmd_up(args: argparse.Namespace) -> int:
    config = load_config(args)
    from tunepipe.tasks.core.runtime import configure_runtime  # lazy: kept off `tunepipe` start-up

    configure_runtime(config.workdir)

    from tunepipe.flows.deployments import pools  # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.ops.prefect_server import LocalStack, ServerError  # lazy: kept off `tunepipe` start-up

    home = Path(os.environ["PREFECT_HOME"])
    stack = LocalStack(prefect_home=home, host=args.host, port=args.port, log_dir=Path(config.workdir) / "logs")
    use_api(stack.url)
    signal.signal(signal.SIGTERM, interrupt)  # a service manager's stop is a Ctrl-C too
    try:
        print(f"starting Prefect server (state in {home}, logs in {stack.log_dir}) ...", flush=True)
        stack.start_server()
        for pool in args.pool or pools(config)[:1]:
            stack.start_worker(pool)
        print(f"Prefect UI:  {stack.ui_url}")
        if args.mlflow:
            from tunepipe.tasks.core.tracking import TrackingSession  # lazy: kept off `tunepipe` start-up

            session = TrackingSession(config.tracking, config.name, config.workdir, "up")
            mlflow_url = stack.start_mlflow(
                session.mlflow_uri(), config.tracking.mlflow.server_port, session.tracking_dir() / "mlflow-artifacts"
            )
            print(f"MLflow UI:   {mlflow_url}")
        print(f"workers:     {', '.join(stack.workers)} (process pools)")
        print(f"next:        export PREFECT_API_URL={stack.url}; tunepipe deployments {args.config or 'CONFIG'}")
        print("Ctrl-C stops the workers and the server.", flush=True)
        while stack.alive():
            time.sleep(1)
        print("tunepipe up: a child process exited; stopping the rest", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"tunepipe up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping workers and server ...", flush=True)
        return 0
    finally:
        stack.stop()


def cmd_deployments(args: argparse.Namespace) -> int:
    config = load_config(args)
    from tunepipe.tasks.core.runtime import configure_runtime  # lazy: kept off `tunepipe` start-up

    url = api_url_of(args)
    use_api(url)
    configure_runtime(config.workdir)
    from tunepipe.flows.deployments import pools, register_deployments  # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.ops.prefect_server import ServerError  # lazy: kept off `tunepipe` start-up

    try:
        ids = register_deployments(args.config, config, workdir=args.workdir, environment=args.env, api_url=url)
    except ServerError as exc:
        print(f"tunepipe deployments: {exc}", file=sys.stderr)
        return 1
    for name, ident in ids.items():
        print(f"deployment {name}  {ident}")
    schedule = config.schedule
    when = "none" if schedule is None else (f"cron '{schedule.cron}' {schedule.timezone}" if schedule.cron else f"every {schedule.interval_s:g}s")
    print(f"schedule: {when}; data-drop trigger: {'on' if config.watch else 'off (no watch: section)'}; pools: {', '.join(pools(config))}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config.watch is None:
        raise ConfigError(f"{args.config}: no `watch:` section: `tunepipe deployments` registers the data-drop trigger only for such configs")
    inbox = args.inbox or config.watch.inbox
    if inbox is None:
        raise ConfigError("no inbox: name one (tunepipe watch INBOX -c CONFIG) or set watch.inbox")
    if "://" not in inbox:
        inbox = str(Path(inbox).resolve())
    from tunepipe.tasks.core.runtime import configure_runtime  # lazy: kept off `tunepipe` start-up

    url = api_url_of(args)
    use_api(url)
    configure_runtime(config.workdir)

    from tunepipe.tasks.ops.prefect_server import ServerError, require_server  # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.ops.watch import Debouncer, Watcher  # lazy: kept off `tunepipe` start-up

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        require_server(url)
    except ServerError as exc:
        print(f"tunepipe watch: {exc}", file=sys.stderr)
        return 1
    watcher = Watcher.from_config(config.name, config.workdir, inbox, config.watch)
    if args.once:
        watcher.debounce = Debouncer(0)
        watcher.flush_unemitted()
        version = watcher.poll()
        print(f"data version {version.version}: {len(version.files)} file(s)" if version else "no new files")
        return 0
    print(f"watching {inbox} for {config.name} (debounce {config.watch.debounce_s:g}s; Ctrl-C stops)", flush=True)
    try:
        watcher.run(config.watch.poll_s)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from tunepipe.tasks.training.join import follow  # lazy: kept off `tunepipe` start-up

    env = load_environment(args.env)
    if env.multi_node is None or env.launcher != "torchrun":
        raise ConfigError(f"{args.env}: not a multi-node profile: `tunepipe join` needs launcher torchrun and a multi_node section")
    if args.node_rank is not None:
        if args.node_rank >= env.multi_node.nodes:
            raise ConfigError(f"--node-rank {args.node_rank} is not below multi_node.nodes {env.multi_node.nodes}")
        env = env.model_copy(update={"multi_node": env.multi_node.model_copy(update={"node_rank": args.node_rank})})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        ran = follow(env, logging.getLogger("tunepipe.join"), max_jobs=args.max_jobs, idle_timeout_s=args.idle_timeout)
    except KeyboardInterrupt:
        return 0
    print(f"joined {ran} training job(s)", flush=True)
    return 0


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start a local Prefect server (UI) and a process worker for the workdir; Ctrl-C stops both")
    add_config_args(up)
    up.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    up.add_argument("--mlflow", action="store_true",
                    help="also start `mlflow server` on the config's tracking store (tracking.mlflow; port server_port)")
    up.add_argument("--pool", action="append", help="work pool to start a process worker for (repeatable; default the config's pool)")
    up.set_defaults(func=cmd_up)

    deployments = sub.add_parser(
        "deployments", help="register the pipeline's Prefect deployments (schedule, data-drop trigger, work pools)"
    )
    add_config_args(deployments)
    deployments.add_argument("--api-url", help="Prefect API (default $PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    deployments.set_defaults(func=cmd_deployments)

    watch = sub.add_parser("watch", help="snapshot new inbox files into data versions and announce them (triggers retraining)")
    watch.add_argument("inbox", nargs="?", help="inbox directory or fsspec URL (default the config's watch.inbox)")
    watch.add_argument("--config", "-c", help="pipeline YAML with a watch: section (default: the bundled quickstart)")
    watch.add_argument("--env", help="environment profile, overriding the config's")
    watch.add_argument("--workdir", help="working directory, overriding the config's")
    watch.add_argument("--api-url", help="Prefect API (default $PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    watch.add_argument("--once", action="store_true", help="take what is in the inbox now (no debounce), announce it, exit")
    watch.set_defaults(func=cmd_watch)

    join = sub.add_parser(
        "join", help="on every other node of a multi-node torchrun profile: run this node's launcher for each training job the stages post"
    )
    join.add_argument("--env", required=True, help="the multi-node profile (the one the pipeline runs with)")
    join.add_argument("--node-rank", type=int, help="this node's rank (static rendezvous; default the profile's, or PET_NODE_RANK)")
    join.add_argument("--max-jobs", type=int, help="stop after this many jobs (default: run until stopped)")
    join.add_argument("--idle-timeout", type=float, help="stop when nothing was posted for this many seconds")
    join.set_defaults(func=cmd_join)
