"""`tunepipe`: the command line. It parses, validates and hands over to the flows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.registry_cli import add_registry_parser
from flows.serve_cli import add_serve_parser
from tasks.config import ConfigError, load_pipeline_config

DEFAULT_QUICKSTART_WORKDIR = "runs/quickstart"


def _load(args: argparse.Namespace):
    workdir = args.workdir
    if args.config is None and workdir is None:
        workdir = DEFAULT_QUICKSTART_WORKDIR  # the bundled quickstart writes under the CWD, not the package
    return load_pipeline_config(args.config, workdir=workdir, environment=args.env)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    from tasks.runtime import configure_runtime

    configure_runtime(config.workdir)
    # Prefect is imported only now, after configure_runtime has set its environment.
    from flows.pipeline import pipeline
    from tasks.run_plan import RunPlan

    try:
        plan = RunPlan(stages=config.stages(), until=args.until, from_stage=args.from_stage)
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[-1].removeprefix("  Value error, ")) from None
    summary = pipeline(config=config, plan=plan)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    print(f"run {summary['run_id']}  workdir {summary['workdir']}")
    for name, stage in summary["stages"].items():
        print(f"  {name:<12} {stage['key']}  {'cached' if stage['cached'] else 'computed'}  {stage['path']}")


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"{config.name}: valid; stages {', '.join(config.stages())}; environment {config.environment}; workdir {config.workdir}")
    return 0


def cmd_envs(args: argparse.Namespace) -> int:
    from tasks.environment import bundled_profiles, load_environment

    for name in bundled_profiles():
        env = load_environment(name)
        print(f"{name:<28} {env.device:<5} {env.dtype:<9} {env.launcher:<11} x{env.num_processes}  {env.description}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from tasks.config_reference import config_reference

    text = config_reference()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _api_url(args: argparse.Namespace) -> str:
    import os

    from tasks.server import api_url

    return args.api_url or os.environ.get("PREFECT_API_URL") or api_url()


def _use_api(url: str) -> None:
    """Point this process's Prefect client at `url`: set before Prefect is first imported."""
    import os

    os.environ["PREFECT_API_URL"] = url


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    import signal
    import time

    config = _load(args)
    from tasks.runtime import configure_runtime

    configure_runtime(config.workdir)
    import os

    from flows.deployments import pools
    from tasks.server import LocalStack, ServerError

    home = Path(os.environ["PREFECT_HOME"])
    stack = LocalStack(prefect_home=home, host=args.host, port=args.port, log_dir=Path(config.workdir) / "logs")
    _use_api(stack.url)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is a Ctrl-C too
    try:
        print(f"starting Prefect server (state in {home}, logs in {stack.log_dir}) ...", flush=True)
        stack.start_server()
        for pool in args.pool or pools(config)[:1]:
            stack.start_worker(pool)
        print(f"Prefect UI:  {stack.ui_url}")
        print(f"workers:     {', '.join(stack.workers)} (process pools)")
        print(f"next:        export PREFECT_API_URL={stack.url}; tunepipe deploy {args.config or 'CONFIG'}")
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


def cmd_deploy(args: argparse.Namespace) -> int:
    config = _load(args)
    from tasks.runtime import configure_runtime

    url = _api_url(args)
    _use_api(url)
    configure_runtime(config.workdir)
    from flows.deployments import deploy, pools
    from tasks.server import ServerError

    try:
        ids = deploy(args.config, config, workdir=args.workdir, environment=args.env, api_url=url)
    except ServerError as exc:
        print(f"tunepipe deploy: {exc}", file=sys.stderr)
        return 1
    for name, ident in ids.items():
        print(f"deployment {name}  {ident}")
    schedule = config.schedule
    when = "none" if schedule is None else (f"cron '{schedule.cron}' {schedule.timezone}" if schedule.cron else f"every {schedule.interval_s:g}s")
    print(f"schedule: {when}; data-drop trigger: {'on' if config.watch else 'off (no watch: section)'}; pools: {', '.join(pools(config))}")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.watch is None:
        raise ConfigError(f"{args.config}: no `watch:` section: `tunepipe deploy` registers the data-drop trigger only for such configs")
    inbox = args.inbox or config.watch.inbox
    if inbox is None:
        raise ConfigError("no inbox: name one (tunepipe watch INBOX -c CONFIG) or set watch.inbox")
    if "://" not in inbox:
        inbox = str(Path(inbox).resolve())
    from tasks.runtime import configure_runtime

    url = _api_url(args)
    _use_api(url)
    configure_runtime(config.workdir)
    import logging

    from tasks.server import ServerError, require_server
    from tasks.watch import Debouncer, Watcher

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


def cmd_plan(args: argparse.Namespace) -> int:
    from schemas.sft import SFTConfig
    from tasks.environment import bundled_profiles, load_environment
    from tasks.plan import pipeline_plan_target, plan

    if args.model:
        method = {"name": args.method}
        if args.lora_r is not None:
            method["r"] = args.lora_r
        if args.lora_alpha is not None:
            method["alpha"] = args.lora_alpha
        if args.target_modules:
            method["target_modules"] = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
        try:
            sft = SFTConfig(model=args.model, method=method, max_length=args.seq_len or 512)
        except ValueError as exc:
            raise ConfigError(f"plan: {exc}") from None
        model, method_config, seq_len, env_name = sft.model, sft.method, sft.max_length, args.env or "cpu"
    else:
        config = _load(args)
        try:
            model, method_config, seq_len = pipeline_plan_target(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        seq_len = args.seq_len or seq_len
        env_name = config.environment
    result = plan(model, method_config, load_environment(env_name), seq_len)
    result["profiles"] = [
        {"environment": name, "total_gb": row["memory"]["total_gb"], "fits": row["memory"]["fits"]}
        for name in bundled_profiles()
        for row in [plan(model, method_config, load_environment(name), seq_len)]
    ]
    if args.json:
        print(json.dumps(result, default=str))
        return 0
    print(f"{result['method']}: {result['trainable_params']:,} trainable of {result['total_params']:,} parameters "
          f"({result['trainable_percent']}%), seq_len {seq_len}")
    print(f"{'profile':<28} {'peak GiB':>9}  fits")
    for row in result["profiles"]:
        print(f"{row['environment']:<28} {row['total_gb']:>9.2f}  {'yes' if row['fits'] else 'NO'}")
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="pipeline YAML (default: the bundled quickstart)")
    parser.add_argument("--env", help="environment profile (bundled name or YAML path), overriding the config's")
    parser.add_argument("--workdir", help="working directory, overriding the config's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunepipe", description="Raw data to a served, fine-tuned LLM, one cached stage at a time.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _add_config_args(run)
    run.add_argument("--until", metavar="STAGE", help="stop after this stage")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="recompute this stage and all after it")
    run.add_argument("--json", action="store_true", help="print the run summary as one JSON object on the last line")
    run.set_defaults(func=cmd_run)

    validate = sub.add_parser("validate", help="check a pipeline config without running anything")
    _add_config_args(validate)
    validate.set_defaults(func=cmd_validate)

    plan = sub.add_parser("plan", help="parameter counts and peak training memory per profile, from the model config alone")
    _add_config_args(plan)
    plan.add_argument("--model", help="hub id or local path: plan this model instead of a pipeline's sft stage")
    plan.add_argument("--method", default="lora", help="fine-tuning method (with --model)")
    plan.add_argument("--lora-r", type=int, help="LoRA rank (with --model)")
    plan.add_argument("--lora-alpha", type=int, help="LoRA alpha (with --model)")
    plan.add_argument("--target-modules", nargs="+", help="modules to adapt, or all-linear (with --model)")
    plan.add_argument("--seq-len", type=int, help="sequence length (default: the stage's max_length, or 512)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    envs = sub.add_parser("envs", help="list the bundled environment profiles")
    envs.set_defaults(func=cmd_envs)

    ref = sub.add_parser("config-reference", help="print the config reference generated from the schemas (markdown)")
    ref.add_argument("--output", "-o", help="write to this file instead of stdout")
    ref.set_defaults(func=cmd_config_reference)

    up = sub.add_parser("up", help="start a local Prefect server (UI) and a process worker for the workdir; Ctrl-C stops both")
    _add_config_args(up)
    up.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=4200, help="server port (default 4200)")
    up.add_argument("--pool", action="append", help="work pool to start a process worker for (repeatable; default the config's pool)")
    up.set_defaults(func=cmd_up)

    deploy = sub.add_parser("deploy", help="register the pipeline's deployments (schedule, data-drop trigger, work pools)")
    _add_config_args(deploy)
    deploy.add_argument("--api-url", help="Prefect API (default $PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    deploy.set_defaults(func=cmd_deploy)

    watch = sub.add_parser("watch", help="snapshot new inbox files into data versions and announce them (triggers retraining)")
    watch.add_argument("inbox", nargs="?", help="inbox directory or fsspec URL (default the config's watch.inbox)")
    watch.add_argument("--config", "-c", help="pipeline YAML with a watch: section (default: the bundled quickstart)")
    watch.add_argument("--env", help="environment profile, overriding the config's")
    watch.add_argument("--workdir", help="working directory, overriding the config's")
    watch.add_argument("--api-url", help="Prefect API (default $PREFECT_API_URL, else http://127.0.0.1:4200/api)")
    watch.add_argument("--once", action="store_true", help="take what is in the inbox now (no debounce), announce it, exit")
    watch.set_defaults(func=cmd_watch)
    add_serve_parser(sub)
    add_registry_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"tunepipe: config error\n{exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a stage's own error is the message the user needs
        from tasks.stage import StageFailed

        if isinstance(exc, StageFailed):
            print(f"tunepipe: stage failed: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
