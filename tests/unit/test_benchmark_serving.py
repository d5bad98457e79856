"""The serving benchmark's pure helpers (no server, no model): arguments, request bodies, figures."""

from __future__ import annotations

import importlib

import pytest

serving = importlib.import_module("benchmarks.serving")  # benchmarks/ is a folder of scripts: a namespace package


def test_defaults_and_bad_arguments():
    args = serving.build_parser().parse_args([])
    assert (args.adapters, args.rank, args.repeats, args.endpoint) == ([1, 4, 16], 8, 3, "chat")
    serving.check_args(args)
    with pytest.raises(SystemExit, match="--adapters"):
        serving.check_args(serving.build_parser().parse_args(["--adapters", "4", "0"]))
    with pytest.raises(SystemExit, match="--max-tokens"):
        serving.check_args(serving.build_parser().parse_args(["--max-tokens", "0"]))


def test_latency_percentiles_and_load_figures():
    latencies = [float(i) for i in range(1, 21)]  # 1..20 s
    summary = serving.latency_summary(latencies)
    assert summary == {"p50_s": pytest.approx(10.5), "p95_s": pytest.approx(19.05), "mean_s": pytest.approx(10.5)}
    with pytest.raises(ValueError):
        serving.latency_summary([])
    figures = serving.Load(latencies=[0.1, 0.3], completion_tokens=[16, 8], wall_s=0.5).figures()
    assert figures["requests_per_s"] == 4.0 and figures["completion_tokens_per_s"] == 48.0
    assert figures["mean_completion_tokens"] == 12.0 and figures["p50_s"] == pytest.approx(0.2)
    runs = [{"requests_per_s": 3.0, "p95_s": 0.2}, {"requests_per_s": 1.0, "p95_s": 0.4}, {"requests_per_s": 2.0, "p95_s": 0.3}]
    assert serving.median_figures(runs) == {"requests_per_s": 2.0, "p95_s": 0.3}


def test_requests_name_adapters_round_robin_greedy_with_fixed_length():
    from tunepipe.tasks.serving.protocol import ChatCompletionRequest, CompletionRequest

    assert serving.round_robin(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    chat = serving.request_body("chat", "a", "Count to three.", 16)
    assert chat == {"model": "a", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "Count to three."}]}
    assert serving.request_body("completions", "base", "hi", 4) == {"model": "base", "max_tokens": 4, "temperature": 0, "prompt": "hi"}
    assert ChatCompletionRequest.model_validate(chat).messages[0].text() == "Count to three."  # what the server parses
    assert CompletionRequest.model_validate(serving.request_body("completions", "base", "hi", 4)).prompt_text() == "hi"


# A stand-in for `vllm serve`: it records its command line, takes a while to become healthy, and
# answers the OpenAI routes the benchmark uses (vLLM itself needs CUDA: ../shared/STACK.md).
STAND_IN_VLLM = """\
#!{python}
import http.server, json, os, signal, sys, time
args = sys.argv[1:]
with open(os.environ["STAND_IN_VLLM_LOG"], "a") as fh:
    fh.write(json.dumps({{"argv": args, "runtime_lora": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING")}}) + "\\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = {{"usage": {{"completion_tokens": body.get("max_tokens", 0)}}}}
        payload = json.dumps(answer if self.path.startswith("/v1/c") else {{}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
    def log_message(self, *a):
        pass
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
time.sleep(0.3)
http.server.ThreadingHTTPServer((host, port), Api).serve_forever()
"""


def test_vllm_engine_drives_vllm_serve_through_the_launcher(tmp_path, monkeypatch):
    import json

    from tests.helpers.training import build_tiny_model

    exe = tmp_path / "bin" / "vllm"
    exe.parent.mkdir()
    exe.write_text(STAND_IN_VLLM.format(python=__import__("sys").executable))
    exe.chmod(0o755)
    launches = tmp_path / "launches.jsonl"
    monkeypatch.setenv("STAND_IN_VLLM_LOG", str(launches))
    base = build_tiny_model(tmp_path / "base")
    result = serving.main([
        "--engine", "vllm", "--base", str(base), "--vllm-executable", str(exe), "--vllm-arg=--enforce-eager",
        "--adapters", "1", "2", "--repeats", "1", "--requests", "4", "--concurrency", "2", "--workdir", str(tmp_path / "work"),
    ])
    argvs = [json.loads(line) for line in launches.read_text().splitlines()]
    # Throughput: one server per adapter count (base and adapter requests on the same server), then
    # the hot-load server and one restart.
    assert len(argvs) == 4 and all(a["runtime_lora"] == "True" for a in argvs)
    first, second = argvs[0]["argv"], argvs[1]["argv"]
    assert first[0] == "serve" and first[1] == str(base) and "--enable-lora" in first and "--enforce-eager" in first
    # behind tunepipe's front, vLLM knows each adapter by its versioned name
    assert first[first.index("--lora-modules") + 1].startswith("adapter-0@") and first[first.index("--max-loras") + 1] == "1"
    assert [a.split("@")[0] for a in second[second.index("--lora-modules") + 1:second.index("--max-loras")]] == ["adapter-0", "adapter-1"]
    assert [run["adapters"] for run in result["throughput"]] == [1, 2]
    assert result["throughput"][1]["median"]["adapters"]["mean_completion_tokens"] == 16.0
    assert result["setup"]["engine"] == "vllm" and "--enable-lora" in result["setup"]["vllm_command"]
    assert result["hot_load"]["median"]["reload_s"] >= 0.3  # a restart waits for /health
    assert result["summary"]["adapter_overhead_ratio"].keys() == {"1", "2"}
    front = result["throughput"][0]["front"]  # the same load through the front and straight to vLLM
    assert front["repeats"][0]["front"]["requests"] == 4 and front["repeats"][0]["direct"]["requests"] == 4
    assert set(result["summary"]["front"]) == {"p50_ratio", "p50_added_ms", "p95_added_ms", "throughput_ratio"}
