"""Tool calling and structured output through the embedded engine, driven by real clients (`openai`, and
LangChain's `ChatOpenAI`).

A tiny random Qwen2.5 whose tokenizer carries the published tool-calling template: it has learnt nothing, so
`tool_choice` required/named must come back as a valid call only because the grammar makes it one, and
tool_choice auto must answer exactly what the model generates from the template's rendering of the tools.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

torch.set_num_threads(1)

from tunepipe.schemas.serve import ServeConfig
from tunepipe.tasks.serving.embedded import build_app
from tunepipe.tasks.serving.process import ServerThread
from tunepipe.tasks.serving.settings import resolve_serve_config
from tunepipe.tasks.serving.tools import parse_tool_calls, render_with_tools

from tests.helpers.tool_models import qwen25_tools_model
from tests.helpers.training import build_tiny_model, cpu_profile

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    base = str(qwen25_tools_model(root / "qwen-tools"))
    config = ServeConfig(base=base, engine="embedded", max_tokens_limit=400, batch_window_ms=10)
    app = build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())
    with ServerThread(app) as server:
        yield {"url": server.url, "base": base, "name": app.state.serve.base_name}


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="none", max_retries=0, timeout=120)


def check_weather_arguments(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and isinstance(args["city"], str) and args["city"] in ("Paris", "Rome", "Oslo")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7
    return args


def test_required_tool_choice_answers_a_valid_call_of_an_offered_tool(client, served):
    reply = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=300)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == ""
    [call] = choice.message.tool_calls  # parallel calls off: the schema allows one
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:
        assert json.loads(call.function.arguments) in ({"zone": "UTC"}, {"zone": "CET"})


def test_required_parallel_calls_cut_by_max_tokens_come_back_as_content_with_length(client, served):
    """This untrained model never closes its list of calls: what it wrote is returned as content, finish_reason
    length (a cut list does not parse), as vLLM answers it."""
    reply = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith('[{"name": "get_')
    assert reply.usage.completion_tokens == 60


def test_named_tool_choice_answers_that_function_with_arguments_in_its_schema(client, served):
    reply = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER, TIME], max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # OpenAI (and vLLM): a named call finishes with stop
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_weather_arguments(call.function.arguments)


def test_auto_answers_what_the_model_generates_from_the_templates_tool_prompt(client, served):
    """An untrained model writes no `<tool_call>`: the answer is its greedy text, from the prompt the template
    renders with the tools (which differs from the prompt without them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served["base"])
    model = AutoModelForCausalLM.from_pretrained(served["base"]).eval()
    ids = tokenizer(render_with_tools(tokenizer, ASK, [WEATHER]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    # the server keeps special tokens (call markers) and, as vLLM, drops a last incomplete character
    expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=False).rstrip("\ufffd")
    with_tools = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER], max_tokens=12)
    without = client.chat.completions.create(model=served["name"], messages=ASK, max_tokens=12)
    assert with_tools.choices[0].message.content == expected
    assert with_tools.usage.prompt_tokens == len(ids) > without.usage.prompt_tokens
    assert parse_tool_calls("hermes", expected)[1] == [] and not with_tools.choices[0].message.tool_calls


def test_tool_choice_none_renders_no_tools(client, served):
    none = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=4)
    plain = client.chat.completions.create(model=served["name"], messages=ASK, max_tokens=4)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_history_with_a_call_and_its_result_is_rendered_and_answered(client, served):
    first = client.chat.completions.create(model=served["name"], messages=ASK, tools=[WEATHER], max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=served["name"], messages=history, tools=[WEATHER], max_tokens=4)
    # the call and the result are in the prompt: it is longer than the first by at least their text
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 5
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # a call is asked for, no tools offered
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "stream": True}, "stream"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                         "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages"),
])
def test_tool_requests_that_cannot_be_honoured_get_400_naming_the_field(served, extra, param):
    body = {"model": served["name"], "messages": ASK, "max_tokens": 4, **extra}
    response = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_model_whose_template_takes_no_tools_answers_400_naming_tools(tmp_path):
    base = str(build_tiny_model(tmp_path / "plain"))
    config = ServeConfig(base=base, engine="embedded", max_tokens_limit=8)
    app = build_app(resolve_serve_config(config, cpu_profile()), cpu_profile())
    with ServerThread(app) as server:
        body = {"model": app.state.serve.base_name, "messages": ASK, "tools": [WEATHER], "max_tokens": 4}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        plain = httpx.post(server.url + "/v1/chat/completions", json={**body, "tools": None}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "no tool support" in response.json()["error"]["message"]
    assert plain.status_code == 200


# ---------------------------------------------------------------------------- LangChain


def test_langchain_with_structured_output_returns_the_pydantic_object(served):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Sentiment(BaseModel):
        label: str = Field(pattern="^(positive|negative)$")
        score: int = Field(ge=0, le=9)

    llm = ChatOpenAI(model=served["name"], base_url=served["url"] + "/v1", api_key="none", max_tokens=60,
                     temperature=0, max_retries=0)
    result = llm.with_structured_output(Sentiment).invoke("I love this dog. Sentiment?")
    assert isinstance(result, Sentiment) and result.label in ("positive", "negative") and 0 <= result.score <= 9


def test_langchain_bind_tools_with_tool_choice_returns_tool_calls(served):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=served["name"], base_url=served["url"] + "/v1", api_key="none", max_tokens=300,
                     temperature=0, max_retries=0)
    # "any" is LangChain's word for required
    message = llm.bind_tools([WEATHER, TIME], tool_choice="any", parallel_tool_calls=False).invoke("Weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] in ("get_weather", "get_time") and call["id"].startswith("chatcmpl-tool-")
    named = llm.bind_tools([WEATHER, TIME], tool_choice="get_weather").invoke("Weather in Paris?")
    [call] = named.tool_calls
    assert call["name"] == "get_weather"
    check_weather_arguments(json.dumps(call["args"]))


def test_the_base_is_listed_under_its_directory_name_and_still_answers_to_its_path(client, served):
    ids = [model.id for model in client.models.list().data]
    assert ids == ["qwen-tools"] and served["name"] == "qwen-tools"
    assert client.models.retrieve("qwen-tools").root == served["base"]
    reply = client.chat.completions.create(model=served["base"], messages=ASK, max_tokens=2)
    assert reply.usage.completion_tokens == 2
