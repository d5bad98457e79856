"""tools.py without a model: which template takes tools and in which family's format, the schemas that force a
call (vLLM's), and each parser on answers written as its family writes them."""

from __future__ import annotations

import json

import pytest

from tunepipe.tasks.serving.tools import (
    NamedToolChoice,
    Tool,
    forced_schema,
    history_for_template,
    parse_tool_calls,
    template_takes_tools,
    tool_call_parser,
    tool_message,
)

from tests.helpers.families import FAMILIES
from tests.helpers.tool_models import QWEN25_TOOLS_TEMPLATE

LLAMA_TOOLS = ("{%- if tools is not none %}{{- 'Environment: ipython' }}{%- for t in tools %}{{ t | tojson }}{%- endfor %}"
               "{%- endif %}{%- for m in messages %}{{ m.content }}{%- endfor %}")
MISTRAL_TOOLS = ("{%- for m in messages %}{%- if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
                 "[/AVAILABLE_TOOLS]{%- endif %}[INST]{{ m.content }}[/INST]{%- endfor %}")
WEATHER = Tool.model_validate({"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
BARE = Tool.model_validate({"type": "function", "function": {"name": "now"}})


@pytest.mark.parametrize("template, parser", [
    (QWEN25_TOOLS_TEMPLATE, "hermes"), (LLAMA_TOOLS, "llama3_json"), (MISTRAL_TOOLS, "mistral"),
    (FAMILIES["qwen2.5"].template, None),  # the same family without its tool branches takes no tools
    (FAMILIES["gemma2"].template, None), (None, None),
    ("{% for t in tools %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}", None),  # tools, unknown format
])
def test_the_tool_call_parser_is_named_from_the_template(template, parser):
    assert tool_call_parser(template) == parser


def test_a_template_takes_tools_only_when_it_reads_the_variable():
    assert template_takes_tools(QWEN25_TOOLS_TEMPLATE) and template_takes_tools("{{ tools }}")
    assert not template_takes_tools("{% set tools = [] %}{{ tools }}")  # assigned by itself: not the caller's
    assert not template_takes_tools(FAMILIES["llama3"].template)


def test_hermes_parses_every_call_and_keeps_the_text_before_them():
    text = 'Let me look.\n<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    content, calls = parse_tool_calls("hermes", text)
    assert content == "Let me look.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("w", {"city": "Oslo"}), ("now", {})]
    assert calls[0]["id"] != calls[1]["id"]
    # an unclosed last call still parses (vLLM's regex takes `<tool_call>(.*)`); broken JSON is plain content
    assert parse_tool_calls("hermes", '<tool_call>{"name": "now", "arguments": {}}')[1][0]["function"]["name"] == "now"
    assert parse_tool_calls("hermes", '<tool_call>{"name": "now", "argu') == ('<tool_call>{"name": "now", "argu', [])
    assert parse_tool_calls("hermes", "no call here") == ("no call here", [])


def test_llama3_json_reads_parameters_or_arguments_after_the_python_tag():
    content, calls = parse_tool_calls("llama3_json", '<|python_tag|>{"name": "w", "parameters": {"city": "Rome"}}; {"name": "now", "arguments": {}}')
    assert content is None and [c["function"]["name"] for c in calls] == ["w", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert parse_tool_calls("llama3_json", "It is sunny.") == ("It is sunny.", [])


def test_mistral_reads_both_its_formats():
    old = parse_tool_calls("mistral", '[TOOL_CALLS] [{"name": "w", "arguments": {"city": "Oslo"}}]')
    new = parse_tool_calls("mistral", '[TOOL_CALLS]w[ARGS]{"city": "Oslo"}')
    for content, calls in (old, new):
        assert content is None and calls[0]["function"]["name"] == "w"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}


def test_forced_schemas_are_vllms():
    required = forced_schema([WEATHER, BARE], "required", None)
    assert required["type"] == "array" and required["minItems"] == 1 and "maxItems" not in required
    names = [item["properties"]["name"]["enum"] for item in required["items"]["anyOf"]]
    assert names == [["w"], ["now"]]
    assert required["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert forced_schema([WEATHER, BARE], "required", False)["maxItems"] == 1
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "w"}})
    assert forced_schema([WEATHER, BARE], named, None) == WEATHER.function.parameters
    assert forced_schema([WEATHER], "auto", None) is None


def test_forced_answers_become_calls_and_their_finish_reasons_follow_openai():
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "w"}})
    message, reason = tool_message('{"city": "Oslo"}', named, "hermes", "stop")
    assert reason == "stop" and message["tool_calls"][0]["function"] == {"name": "w", "arguments": '{"city": "Oslo"}'}
    message, reason = tool_message('[{"name": "now", "parameters": {}}]', "required", None, "stop")
    assert reason == "tool_calls" and message["content"] == "" and message["tool_calls"][0]["function"]["name"] == "now"
    message, reason = tool_message('[{"name": "now", "param', "required", None, "length")
    assert reason == "length" and "tool_calls" not in message and message["content"] == '[{"name": "now", "param'
    message, reason = tool_message('<tool_call>{"name": "now", "arguments": {}}</tool_call>', "auto", "hermes", "stop")
    assert reason == "tool_calls" and message["content"] is None


def test_history_arguments_reach_the_template_as_objects():
    history = history_for_template([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]}])
    assert history[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    with pytest.raises(ValueError, match="arguments is not JSON"):
        history_for_template([{"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": "{x"}}]}])


# ---------------------------------------------------------------------------- vLLM's flags and the base's name


def write_base(path, template: str | None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template} if template else {}))
    return str(path)


def vllm_config(tmp_path, base: str, **vllm):
    from tunepipe.schemas.serve import ServeConfig
    from tunepipe.tasks.core.environment import load_environment
    from tunepipe.tasks.serving.settings import resolve_serve_config

    return resolve_serve_config(ServeConfig(engine="vllm", base=base, vllm=vllm), load_environment("serve-vllm-cpu"))


def test_vllm_starts_with_the_tool_call_parser_of_the_bases_family(tmp_path):
    from tunepipe.tasks.serving.vllm import vllm_command

    tools = vllm_command(vllm_config(tmp_path, write_base(tmp_path / "qwen", QWEN25_TOOLS_TEMPLATE)))
    assert tools[tools.index("--tool-call-parser") + 1] == "hermes" and "--enable-auto-tool-choice" in tools
    llama = vllm_command(vllm_config(tmp_path, write_base(tmp_path / "llama", LLAMA_TOOLS)))
    assert llama[llama.index("--tool-call-parser") + 1] == "llama3_json"
    plain = vllm_command(vllm_config(tmp_path, write_base(tmp_path / "plain", FAMILIES["qwen2.5"].template)))
    assert "--tool-call-parser" not in plain and "--enable-auto-tool-choice" not in plain
    chosen = vllm_command(vllm_config(tmp_path, str(tmp_path / "plain"), tool_call_parser="pythonic"))
    assert chosen[chosen.index("--tool-call-parser") + 1] == "pythonic"
    off = vllm_command(vllm_config(tmp_path, str(tmp_path / "qwen"), tool_call_parser="none"))
    assert "--enable-auto-tool-choice" not in off
    # constrained JSON without free whitespace, as the embedded engine decodes it; a user's own setting wins
    assert json.loads(tools[tools.index("--structured-outputs-config") + 1]) == {"backend": "xgrammar", "disable_any_whitespace": True}
    own = vllm_command(vllm_config(tmp_path, str(tmp_path / "qwen"), extra_args=["--structured-outputs-config={}"]))
    assert [arg for arg in own if arg.startswith("--structured-outputs-config")] == ["--structured-outputs-config={}"]


def test_the_base_is_served_under_its_name_not_its_path(tmp_path):
    from tunepipe.tasks.serving.settings import served_base_name
    from tunepipe.tasks.serving.vllm import vllm_command

    base = write_base(tmp_path / "models" / "SmolLM2-135M-Instruct", None)
    config = vllm_config(tmp_path, base)
    assert config.served_model_name == "SmolLM2-135M-Instruct"
    command = vllm_command(config)
    at = command.index("--served-model-name")
    assert command[at + 1] == "SmolLM2-135M-Instruct" and base not in command[at + 1:]  # the front maps the path
    assert served_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert served_base_name(str(tmp_path / "m" / "smol.Q4_1.gguf")) == "smol.Q4_1"
    assert served_base_name(base + "/") == "SmolLM2-135M-Instruct"
    named = vllm_config(tmp_path, base).model_copy(update={"served_model_name": "smol"})
    assert vllm_command(named)[at + 1] == "smol"
