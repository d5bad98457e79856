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
    from tasks.serve.protocol import ChatCompletionRequest, CompletionRequest

    assert serving.round_robin(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]
    chat = serving.request_body("chat", "a", "Count to three.", 16)
    assert chat == {"model": "a", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "Count to three."}]}
    assert serving.request_body("completions", "base", "hi", 4) == {"model": "base", "max_tokens": 4, "temperature": 0, "prompt": "hi"}
    assert ChatCompletionRequest.model_validate(chat).messages[0].text() == "Count to three."  # what the server parses
    assert CompletionRequest.model_validate(serving.request_body("completions", "base", "hi", 4)).prompt_text() == "hi"
