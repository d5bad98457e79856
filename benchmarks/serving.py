"""Serving: the embedded multi-LoRA server's throughput and latency with N adapters against the base
alone, and adapter hot-load time against a full reload.

    .venv/bin/python benchmarks/serving.py                                  # tiny Llama, 1/4/16 adapters, 3 repeats
    .venv/bin/python benchmarks/serving.py --base PATH                      # a real base (e.g. a base_model artifact)
    .venv/bin/python benchmarks/serving.py --repeats 1 --requests 8         # a smoke run

The base is a tiny Llama built on the fly (the tests' `build_tiny_model`) or `--base PATH`. The
adapters are random-init LoRA adapters (`init_lora_weights=False`, so they change the answers) of
rank `--rank` on all linear layers, saved to the benchmark's workdir; no training.

Throughput. One real uvicorn server (`ServerThread`, in this process) serves the base alone (no
adapter loaded: the plain model, no peft wrapper), and for each N in `--adapters` another serves
the base with N start-up adapters. A load generator of `--concurrency` threads (httpx, one
keep-alive pool) sends `--requests` chat (or `--endpoint completions`) requests with fixed
`max_tokens`, greedy; to the N-adapter server each request names an adapter round-robin, to the
base server the base's name. Each server gets a warm-up of `--concurrency` requests first. Then,
`--repeats` times in alternating order (base first in even repeats), both servers take the same
load. Per side: requests/s (requests / wall of the whole load), p50/p95 request latency and
completion tokens/s; per repeat the adapter overhead ratio = adapters req/s / base req/s; medians.
Completion tokens are reported too: greedy decoding may stop at EOS early on one side, so compare
tokens/s where the mean completion lengths differ.

Hot-load. On a server with one start-up adapter, `POST /v1/load_lora_adapter` of another adapter
(wall as the client sees it) and its `POST /v1/unload_lora_adapter`, against a full reload: a new
`build_app` of the same config from disk (base and start-up adapter) plus a server start until
/health answers. `--repeats` pairs in alternating order; ratio = load / reload per pair, median
compared with the target 0.05. Both read warm files (page cache) and run with the libraries
imported, so the reload figure is the lower bound of a real restart.

`--engine vllm` measures vLLM instead, as `tunepipe serve --engine vllm` runs it: vLLM from the
profile's environment (`--environment serve-vllm-cpu`: `tunepipe vllm-env cpu`'s) behind
tunepipe's front (tasks/serving/front.py), one server per adapter count with N start-up adapters,
base and adapter requests on that same server; hot-load (through the front) against a full
restart. With one adapter it also sends the same load to vLLM directly, alternating with the
front: `front` is what the front adds (p50/p95 ratio and milliseconds). `--engine both` runs the
embedded engine and vLLM on the same base, adapters and load in one run. Without --base, the base
is the tiny Llama at hidden size 128 for vLLM (its CPU attention needs a head size of 32).

The load generator shares the process (and the GIL) with the server, alike on both sides of a
ratio; compare ratios across machines, not absolute rates. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import header, median, print_result, ratio, rounded  # noqa: E402

HOT_LOAD_TARGET = 0.05  # hot-load at most 5% of a full reload
BASE_NAME = "base"
PROMPTS = [
    "Count to three.",
    "Classify the sentiment. I love the dog.",
    "Name a colour.",
    "What is the capital of france?",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="base model directory (default: a tiny Llama built on the fly)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16], help="adapter counts to measure")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters (all-linear)")
    parser.add_argument("--requests", type=int, default=64, help="requests per measured load")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads sending requests at once")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (greedy decoding)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                        help="chat: /v1/chat/completions (needs a chat template); completions: /v1/completions")
    parser.add_argument("--repeats", type=int, default=3, help="measured pairs per comparison (alternating order)")
    parser.add_argument("--environment", default="cpu", help="environment profile (dtype, attention kernel)")
    parser.add_argument("--attn", default=None, help="attention kernel instead of the profile's (e.g. sdpa where flash-attn is not installed)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="server max_batch_size (default: ServeConfig's)")
    parser.add_argument("--no-hot-load", action="store_true", help="skip the hot-load vs reload measurement")
    parser.add_argument("--engine", choices=("embedded", "vllm", "both"), default="embedded",
                        help="embedded: tunepipe's server in this process; vllm: vLLM behind tunepipe's front; both: each, same load")
    parser.add_argument("--vllm-executable", default=None,
                        help="a `vllm` executable (default: the profile's serving.vllm_python / vllm_image)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="one more `vllm serve` argument (repeatable)")
    parser.add_argument("--workdir", default=None, help="where the base and adapters are written (default: a temp dir)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    for name in ("rank", "requests", "concurrency", "max_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if any(n < 1 for n in args.adapters):
        raise SystemExit(f"--adapters: counts must be at least 1 (the base alone is always measured): {args.adapters}")


# --------------------------------------------------------------------------------------------
# Figures


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50/p95/mean of request latencies in seconds (numpy's linear-interpolation percentiles)."""
    import numpy as np

    if not latencies:
        raise ValueError("no latencies to summarise")
    p50, p95 = np.percentile(latencies, [50, 95])
    return {"p50_s": float(p50), "p95_s": float(p95), "mean_s": float(np.mean(latencies))}


@dataclass
class Load:
    """One measured load: each request's latency and completion tokens, and the load's wall."""

    latencies: list[float]
    completion_tokens: list[int]
    wall_s: float

    def figures(self) -> dict[str, Any]:
        tokens = sum(self.completion_tokens)
        return {
            "requests": len(self.latencies), "wall_s": rounded(self.wall_s, 4),
            "requests_per_s": rounded(len(self.latencies) / self.wall_s, 3),
            "completion_tokens_per_s": rounded(tokens / self.wall_s, 2),
            "mean_completion_tokens": rounded(tokens / len(self.completion_tokens), 2),
            **{k: rounded(v, 4) for k, v in latency_summary(self.latencies).items()},
        }


def round_robin(names: list[str], count: int) -> list[str]:
    """The model each of `count` requests names: the adapters in turn."""
    return [names[i % len(names)] for i in range(count)]


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each numeric figure over the repeats."""
    return {key: rounded(median(run[key] for run in runs), 4) for key in runs[0] if isinstance(runs[0][key], (int, float))}


# --------------------------------------------------------------------------------------------
# Model and adapters


def make_base(workdir: Path, engine: str) -> str:
    from tests.helpers.training import build_tiny_model

    if engine == "embedded":
        return str(build_tiny_model(workdir / "base"))
    return str(build_tiny_model(workdir / "base", hidden_size=128, num_key_value_heads=4, max_position_embeddings=512))


def make_adapters(base: str, root: Path, names: list[str], rank: int, dtype: str) -> dict[str, str]:
    """Random-init LoRA adapters (rank `rank`, all linear layers), one seed each, from one load of the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunepipe.tasks.lm.modeling import load_model

    model = load_model(base, dtype=dtype)
    paths = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(root / name)
        model = peft_model.unload()  # the base again, without the LoRA layers, for the next adapter
        paths[name] = str(root / name)
    return paths


# --------------------------------------------------------------------------------------------
# Servers


def serve_config(base: str, adapters: dict[str, str], args: argparse.Namespace, allowed: Path):
    from tunepipe.schemas.serve import ServeConfig

    extra = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    return ServeConfig(
        base=base, served_model_name=BASE_NAME, lora_modules=adapters, engine="embedded",
        allowed_adapter_dirs=[str(allowed)], max_loras=len(adapters) + 1, max_lora_rank=args.rank,
        max_tokens_limit=args.max_tokens, max_concurrency=max(64, args.concurrency), **extra,
    )


def start_server(config, profile):
    """Build the app (load base and start-up adapters) and serve it; returns the running ServerThread."""
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.settings import resolve_serve_config

    return serve_app(build_app(resolve_serve_config(config, profile), profile))


def serve_app(app):
    """Start a ServerThread for `app` and return it once /health answers. Polled every 5 ms, not
    ServerThread.start's 200 ms: the reload's timing must not round up to the poll interval."""
    from tunepipe.tasks.serving.process import ServerThread, wait_healthy

    server = ServerThread(app)
    server.thread.start()
    wait_healthy(f"{server.url}/health", 600, alive=server.thread.is_alive, interval=0.005)
    return server


def stop_server(server) -> None:
    server.stop()
    gc.collect()  # drop the model before the next server loads its own


def vllm_config(base: str, adapters: dict[str, str], args: argparse.Namespace, allowed: Path):
    """The ServeConfig `tunepipe serve --engine vllm` would run, on a free port."""
    import socket

    from tunepipe.schemas.serve import ServeConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vllm = {"extra_args": list(args.vllm_arg), **({"executable": args.vllm_executable} if args.vllm_executable else {})}
    return ServeConfig(
        base=base, served_model_name=BASE_NAME, lora_modules=adapters, engine="vllm", port=port,
        allowed_adapter_dirs=[str(allowed)], max_loras=max(len(adapters), 1), max_lora_rank=args.rank,
        max_tokens_limit=args.max_tokens, max_concurrency=max(64, args.concurrency), vllm=vllm,
    )


@dataclass
class FrontedVLLM:
    """vLLM behind tunepipe's front, as `tunepipe serve --engine vllm` runs them; `url` is the front's."""

    server: Any  # VLLMServer (private port and key)
    front: Any  # ServerThread of the front app
    names: dict[str, str]  # alias → the versioned name vLLM knows

    @property
    def url(self) -> str:
        return self.front.url

    def stop(self) -> None:
        self.front.stop()
        self.server.stop()


def start_vllm(config, profile, log_file: Path) -> FrontedVLLM:
    """vLLM and its front, returned once both answer /health."""
    from tunepipe.tasks.serving.front import vllm_behind_front
    from tunepipe.tasks.serving.settings import resolve_serve_config

    app, front, server = vllm_behind_front(resolve_serve_config(config, profile), api_key=None, log_file=log_file)
    server.start()
    try:
        return FrontedVLLM(server, serve_app(app), dict(front.aliases))
    except Exception:
        server.stop()
        raise


# --------------------------------------------------------------------------------------------
# Load generator


def request_body(endpoint: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def run_load(client, url: str, models: list[str], *, endpoint: str, concurrency: int, max_tokens: int) -> Load:
    """Send one request per entry of `models` from `concurrency` threads; fail on any non-200."""
    path = f"{url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    bodies = [request_body(endpoint, model, PROMPTS[i % len(PROMPTS)], max_tokens) for i, model in enumerate(models)]
    order = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = [0.0] * len(bodies)
    tokens: list[int] = [0] * len(bodies)
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                i = next(order)
            if i >= len(bodies) or errors:
                return
            started = time.perf_counter()
            response = client.post(path, json=bodies[i])
            latencies[i] = time.perf_counter() - started
            if response.status_code != 200:
                errors.append(f"{bodies[i]['model']}: HTTP {response.status_code} {response.text[:300]}")
                return
            tokens[i] = int(response.json()["usage"]["completion_tokens"])

    threads = [threading.Thread(target=worker, name=f"bench-client-{k}") for k in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{path}: {len(errors)} request(s) failed, first: {errors[0]}")
    return Load(latencies, tokens, wall)


# --------------------------------------------------------------------------------------------
# The two measurements


def measure_overhead(client, base_server, adapter_server, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Alternating base / N-adapter loads; per repeat figures, the ratio, and medians."""
    load = dict(endpoint=args.endpoint, concurrency=args.concurrency, max_tokens=args.max_tokens)
    sides = {
        "base": (base_server.url, [BASE_NAME] * args.requests),
        "adapters": (adapter_server.url, round_robin(names, args.requests)),
    }
    for url, models in sides.values():  # warm-up: first generate calls, connection pool
        run_load(client, url, models[: args.concurrency], **load)
    repeats = []
    for r in range(args.repeats):
        order = ["base", "adapters"] if r % 2 == 0 else ["adapters", "base"]
        figures = {side: run_load(client, *sides[side], **load).figures() for side in order}
        repeats.append({
            "order": order, **figures,
            "ratio": rounded(ratio(figures["adapters"]["requests_per_s"], figures["base"]["requests_per_s"]), 4),
            "tokens_ratio": rounded(ratio(figures["adapters"]["completion_tokens_per_s"], figures["base"]["completion_tokens_per_s"]), 4),
        })
    return {
        "adapters": len(names), "repeats": repeats,
        "median": {
            "base": median_figures([rep["base"] for rep in repeats]),
            "adapters": median_figures([rep["adapters"] for rep in repeats]),
            "ratio": rounded(median(rep["ratio"] for rep in repeats), 4),
            "tokens_ratio": rounded(median(rep["tokens_ratio"] for rep in repeats), 4),
        },
    }


def time_hot_load(client, server, name: str, path: str) -> dict[str, float]:
    """Client-side wall of loading then unloading one adapter at runtime."""
    timings = {}
    for action, body in (("load", {"lora_name": name, "lora_path": path}), ("unload", {"lora_name": name})):
        started = time.perf_counter()
        response = client.post(f"{server.url}/v1/{action}_lora_adapter", json=body)
        timings[f"{action}_s"] = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{action} {name}: HTTP {response.status_code} {response.text[:300]}")
    return timings


def time_reload(config, profile) -> dict[str, float]:
    """A full reload: build the app from disk (base + start-up adapters) and serve it until healthy."""
    from tunepipe.tasks.serving.embedded import build_app
    from tunepipe.tasks.serving.settings import resolve_serve_config

    started = time.perf_counter()
    app = build_app(resolve_serve_config(config, profile), profile)
    built = time.perf_counter()
    server = serve_app(app)
    healthy = time.perf_counter()
    stop_server(server)
    return {"build_app_s": built - started, "server_start_s": healthy - built, "reload_s": healthy - started}


def time_vllm_restart(config, profile, log_file: Path) -> dict[str, float]:
    """A full reload under vLLM: a new vLLM (and front) of the same config, from start to /health."""
    started = time.perf_counter()
    server = start_vllm(config, profile, log_file)
    healthy = time.perf_counter()
    server.stop()
    return {"reload_s": healthy - started}


def hot_load_pair(hot_load: dict[str, float], reloaded: dict[str, float], order: list[str]) -> dict[str, Any]:
    return {
        "order": order, **{k: rounded(v, 4) for k, v in {**hot_load, **reloaded}.items()},
        "ratio": rounded(ratio(hot_load["load_s"], reloaded["reload_s"]), 5),
        "swap_ratio": rounded(ratio(hot_load["load_s"] + hot_load["unload_s"], reloaded["reload_s"]), 5),
    }


def measure_hot_load(client, base: str, adapters: dict[str, str], allowed: Path, args: argparse.Namespace, profile,
                     workdir: Path, engine: str) -> dict[str, Any]:
    (first, first_path), (hot, hot_path) = list(adapters.items())[:2]
    repeats = []
    if engine == "vllm":
        # Two vLLM engines do not share a GPU at the profile's memory utilisation: the hot-loads run
        # first on one server, then the restarts once it is stopped (minutes each: order adds no noise).
        config = vllm_config(base, {first: first_path}, args, allowed)
        server = start_vllm(config, profile, workdir / "logs" / "vllm-hot-load.log")
        try:
            time_hot_load(client, server, hot, hot_path)  # warm-up
            loads = [time_hot_load(client, server, hot, hot_path) for _ in range(args.repeats)]
        finally:
            server.stop()
        for load in loads:
            restart = time_vllm_restart(vllm_config(base, {first: first_path}, args, allowed), profile, workdir / "logs" / "vllm-reload.log")
            repeats.append(hot_load_pair(load, restart, ["hot_load", "reload"]))
    else:
        config = serve_config(base, {first: first_path}, args, allowed)
        server = start_server(config, profile)
        try:
            time_hot_load(client, server, hot, hot_path)  # warm-up: peft's first load into this model
            for r in range(args.repeats):
                if r % 2 == 0:
                    hot_load, reloaded = time_hot_load(client, server, hot, hot_path), time_reload(config, profile)
                else:
                    reloaded, hot_load = time_reload(config, profile), time_hot_load(client, server, hot, hot_path)
                repeats.append(hot_load_pair(hot_load, reloaded, ["hot_load", "reload"] if r % 2 == 0 else ["reload", "hot_load"]))
        finally:
            stop_server(server)
    medians = {key: rounded(median(rep[key] for rep in repeats), 5) for key in repeats[0] if key != "order"}
    return {"start_up_adapters": 1, "hot_adapter": hot, "repeats": repeats, "median": medians,
            "target": HOT_LOAD_TARGET, "target_met": medians["ratio"] <= HOT_LOAD_TARGET}


def embedded_throughput(client, base, adapters, names, allowed, args, profile, workdir) -> list[dict[str, Any]]:
    """The base alone (no peft wrapper) on one server against N adapters on another, for each N."""
    base_server = start_server(serve_config(base, {}, args, allowed), profile)
    try:
        overhead = []
        for count in args.adapters:
            served = {name: adapters[name] for name in names[:count]}
            adapter_server = start_server(serve_config(base, served, args, allowed), profile)
            try:
                overhead.append(measure_overhead(client, base_server, adapter_server, list(served), args))
            finally:
                stop_server(adapter_server)
    finally:
        stop_server(base_server)
    return overhead


def vllm_throughput(client, base, adapters, names, allowed, args, profile, workdir) -> list[dict[str, Any]]:
    """For each N, one vLLM (behind the front) with N adapters: requests naming the base against requests naming
    the adapters, on the same server (a deployment serves both from one LoRA-enabled engine). With the first N,
    also the front's own cost (see measure_front)."""
    overhead = []
    for count in args.adapters:
        served = {name: adapters[name] for name in names[:count]}
        server = start_vllm(vllm_config(base, served, args, allowed), profile, workdir / "logs" / f"vllm-{count}.log")
        try:
            overhead.append(measure_overhead(client, server, server, list(served), args))
            if count == args.adapters[0]:
                overhead[-1]["front"] = measure_front(server, list(served), args)
        finally:
            server.stop()
    return overhead


def measure_front(server: FrontedVLLM, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The same adapter load through the front and straight to vLLM (its private port and key), alternating."""
    import httpx

    load = dict(endpoint=args.endpoint, concurrency=args.concurrency, max_tokens=args.max_tokens)
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    key = server.server.env.get("VLLM_API_KEY")
    with httpx.Client(timeout=600, limits=limits, trust_env=False) as front_client, \
            httpx.Client(timeout=600, limits=limits, trust_env=False, headers={"Authorization": f"Bearer {key}"}) as direct:
        sides = {"front": (front_client, server.url, round_robin(names, args.requests)),
                 "direct": (direct, server.server.url, round_robin([server.names[n] for n in names], args.requests))}
        for http, url, models in sides.values():
            run_load(http, url, models[: args.concurrency], **load)
        repeats = []
        for r in range(args.repeats):
            order = ["direct", "front"] if r % 2 == 0 else ["front", "direct"]
            figures = {side: run_load(*sides[side], **load).figures() for side in order}
            repeats.append({"order": order, **figures,
                            "p50_ratio": rounded(ratio(figures["front"]["p50_s"], figures["direct"]["p50_s"]), 4),
                            "p50_added_ms": rounded(1000 * (figures["front"]["p50_s"] - figures["direct"]["p50_s"]), 2),
                            "p95_added_ms": rounded(1000 * (figures["front"]["p95_s"] - figures["direct"]["p95_s"]), 2),
                            "throughput_ratio": rounded(ratio(figures["front"]["requests_per_s"], figures["direct"]["requests_per_s"]), 4)})
    return {"repeats": repeats, "median": {k: rounded(median(rep[k] for rep in repeats), 4)
                                           for k in ("p50_ratio", "p50_added_ms", "p95_added_ms", "throughput_ratio")}}


# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_args(args)
    import httpx

    from tunepipe.tasks.core.environment import load_environment

    result = header("serving.py", argv)
    profile = load_environment(args.environment)
    if args.attn:
        profile = profile.model_copy(update={"attn_implementation": args.attn})
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunepipe-bench-serving-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    engines = ["embedded", "vllm"] if args.engine == "both" else [args.engine]
    base = str(Path(args.base).resolve()) if args.base else make_base(workdir, "vllm" if "vllm" in engines else "embedded")
    allowed = workdir / "adapters"
    names = [f"adapter-{i}" for i in range(max(max(args.adapters), 2))]  # at least two: hot-load needs a spare
    started = time.perf_counter()
    adapters = make_adapters(base, allowed, names, args.rank, profile.dtype)
    result["setup"] = {
        "base": base, "tiny_base": args.base is None, "adapter_rank": args.rank, "target_modules": "all-linear",
        "adapters_dir": str(allowed), "adapters_built_s": rounded(time.perf_counter() - started, 2),
        "environment": args.environment, "device": profile.device, "dtype": profile.dtype,
        "attn": profile.attn_implementation, "endpoint": args.endpoint,
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "max_batch_size": serve_config(base, {}, args, allowed).max_batch_size,
        "batch_window_ms": serve_config(base, {}, args, allowed).batch_window_ms,
        "engine": args.engine,
    }
    if "vllm" in engines:  # vLLM's command line (the embedded batcher's settings apply to the embedded side only)
        from tunepipe.tasks.serving.settings import resolve_serve_config
        from tunepipe.tasks.serving.vllm import vllm_command

        example = resolve_serve_config(vllm_config(base, {names[0]: adapters[names[0]]}, args, allowed), profile)
        result["setup"]["vllm_command"] = vllm_command(example)

    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency + 2)
    runs = {}
    with httpx.Client(timeout=600, limits=limits, trust_env=False) as client:
        for engine in engines:
            measure = vllm_throughput if engine == "vllm" else embedded_throughput
            run = {"throughput": measure(client, base, adapters, names, allowed, args, profile, workdir)}
            if not args.no_hot_load:
                run["hot_load"] = measure_hot_load(client, base, adapters, allowed, args, profile, workdir, engine)
            runs[engine] = run
    if len(engines) == 1:
        result.update(runs[engines[0]])
    else:
        result["engines"] = runs
    result["summary"] = {engine: summary(run) for engine, run in runs.items()} if len(engines) > 1 else summary(runs[engines[0]])
    return result


def summary(run: dict[str, Any]) -> dict[str, Any]:
    overhead = run["throughput"]
    out = {
        "adapter_overhead_ratio": {str(r["adapters"]): r["median"]["ratio"] for r in overhead},
        "adapter_overhead_tokens_ratio": {str(r["adapters"]): r["median"]["tokens_ratio"] for r in overhead},
        "requests_per_s": {"base": overhead[0]["median"]["base"]["requests_per_s"],
                           **{str(r["adapters"]): r["median"]["adapters"]["requests_per_s"] for r in overhead}},
        "p50_s": {"base": overhead[0]["median"]["base"]["p50_s"], **{str(r["adapters"]): r["median"]["adapters"]["p50_s"] for r in overhead}},
        "p95_s": {"base": overhead[0]["median"]["base"]["p95_s"], **{str(r["adapters"]): r["median"]["adapters"]["p95_s"] for r in overhead}},
    }
    if "front" in overhead[0]:
        out["front"] = overhead[0]["front"]["median"]
    if "hot_load" in run:
        out.update({"hot_load_ratio": run["hot_load"]["median"]["ratio"], "hot_load_target": HOT_LOAD_TARGET,
                    "hot_load_target_met": run["hot_load"]["target_met"], "hot_load_s": run["hot_load"]["median"]["load_s"],
                    "reload_s": run["hot_load"]["median"]["reload_s"]})
    return out


if __name__ == "__main__":
    with contextlib.redirect_stdout(sys.stderr):  # libraries' notices (deepspeed's accelerator line): stdout is the JSON
        figures = main(sys.argv[1:])
    print_result(figures)
