"""Tool calling (`tools`, `tool_choice`) as vLLM's OpenAI server does it, for the embedded engine and vLLM's flags.

- The tools are rendered by the model's own chat template (`apply_chat_template(tools=...)`), so only a template
  that reads `tools` can take them; any other model answers 400 naming `tools`.
- Which format the model writes calls in is the template's family, named as vLLM's `--tool-call-parser` names
  it: `hermes` (`<tool_call>{"name", "arguments"}</tool_call>`: Qwen2.5/Qwen3, Hermes, ChatML tool templates),
  `llama3_json` (a JSON object `{"name", "parameters"}`, after `<|python_tag|>` or bare: Llama 3.1/3.2) and
  `mistral` (`[TOOL_CALLS] [{"name", "arguments"}, ...]`). `parse_tool_calls` extracts calls as vLLM's parser of
  that name does for a finished answer.
- `tool_choice: "required"` and a named function are decoded under a JSON schema (vLLM's own:
  `tool_parsers/utils.py::get_json_schema_from_tools`): a list of `{"name", "parameters"}` for required, the
  function's arguments for a named one. Even an untrained model then answers a call that parses.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")

# How each family marks a call in its template (and so in its answers).
_PARSER_MARKERS = (("hermes", ("<tool_call>",)), ("mistral", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
                   ("llama3_json", ("<|python_tag|>", "ipython")))


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: ToolFunction

    def for_template(self) -> dict[str, Any]:
        """The tool as vLLM hands it to the chat template (its FunctionDefinition's dump): `description` and
        `parameters` always (null when absent), `strict` only when set; so both engines render the same prompt."""
        function = {"name": self.function.name, "description": self.function.description,
                    "parameters": self.function.parameters}
        if self.function.strict is not None:
            function["strict"] = self.function.strict
        return {"type": self.type, "function": function}


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the answer is a call of that function."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# ---------------------------------------------------------------------------- the template's side


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable (so it renders what it is given)."""
    if not template:
        return False
    from jinja2 import Environment, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except Exception:  # noqa: BLE001 - a template jinja2 cannot parse plainly (custom tags): look for the word
        return "tools" in template


def tool_call_parser(template: str | None) -> str | None:
    """vLLM's `--tool-call-parser` for a chat template that takes tools, or None (no tools, or a family whose
    call format this server does not parse)."""
    if not template_takes_tools(template):
        return None
    for parser, markers in _PARSER_MARKERS:
        if any(marker in template for marker in markers):
            return parser
    return None


def base_chat_template(base: str | Path) -> str | None:
    """The chat template a local model directory ships (tokenizer_config.json or chat_template.jinja), without
    loading its tokenizer; None for a hub id or a directory without one."""
    root = Path(base)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text()
    config = root / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: the default one, else the tool-use one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("tool_use") or named.get("default")
        return template if isinstance(template, str) else None
    return None


# ---------------------------------------------------------------------------- the request's side


def history_for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: an assistant's `tool_calls[].function.arguments` as a dict (OpenAI
    sends a JSON string; templates apply `tojson` to it, as vLLM converts it before rendering)."""
    rendered = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_call_for_template(call) for call in calls]}
        rendered.append(message)
    return rendered


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ValueError(f"tool call {function.get('name')!r}: arguments is not JSON: {arguments[:200]!r}") from None
    return {**call, "function": function}


def forced_schema(tools: list[Tool], choice: ToolChoice, parallel: bool | None) -> dict[str, Any] | None:
    """The JSON schema an answer must follow for `choice` (vLLM's get_json_schema_from_tools), or None (auto,
    none: the model decides)."""
    if isinstance(choice, NamedToolChoice):
        return _parameters(tool_named(tools, choice.function.name))
    if choice != "required":
        return None
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": _parameters(tool)},
         "required": ["name", "parameters"]} for tool in tools]}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def tool_named(tools: list[Tool], name: str) -> Tool:
    for tool in tools:
        if tool.function.name == name:
            return tool
    raise ValueError(f"tool_choice names the function {name!r}, which is not among `tools`")


# ---------------------------------------------------------------------------- the answer's side


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def forced_calls(text: str, choice: ToolChoice) -> list[dict[str, Any]]:
    """The calls of an answer decoded under `forced_schema` (the grammar makes it parse)."""
    value = json.loads(text)
    if isinstance(choice, NamedToolChoice):
        return [_call(choice.function.name, value)]
    return [_call(item["name"], item["parameters"]) for item in value]


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a finished answer, as vLLM's `parser` extracts them; an answer whose calls do not
    parse is content with no calls (vLLM does the same)."""
    try:
        return _PARSERS[parser](text)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return text, []


def _hermes(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    start, end = "<tool_call>", "</tool_call>"
    if start not in text:
        return text, []
    calls, position = [], text.find(start)
    content = text[:position]
    while position >= 0:
        body_start = position + len(start)
        body_end = text.find(end, body_start)
        body = text[body_start:] if body_end < 0 else text[body_start:body_end]
        call = json.loads(body)
        calls.append(_call(call["name"], call["arguments"]))
        position = -1 if body_end < 0 else text.find(start, body_end)
    return content or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Every JSON object in the answer that has a name and arguments (or parameters)."""
    if "<|python_tag|>" not in text and "{" not in text:
        return text, []
    decoder, calls, index = json.JSONDecoder(), [], text.find("{")
    while index >= 0:
        value, length = decoder.raw_decode(text[index:])
        calls.append(_call(value["name"], value["arguments"] if "arguments" in value else value["parameters"]))
        index = text.find("{", index + length)
    if not calls:
        return text, []
    return None, calls


def _mistral(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """`[TOOL_CALLS] [{"name", "arguments"}, ...]` (v0.3 tokenizers) or `[TOOL_CALLS]name[ARGS]{...}` (newer)."""
    marker = "[TOOL_CALLS]"
    if marker not in text:
        return text, []
    content, _, rest = text.partition(marker)
    calls = []
    if "[ARGS]" in rest:
        for part in rest.split(marker):
            name, _, arguments = part.partition("[ARGS]")
            calls.append(_call(name.strip(), json.loads(arguments)))
    else:
        value = json.loads(rest.strip())
        for call in value if isinstance(value, list) else [value]:
            calls.append(_call(call["name"], call["arguments"]))
    return content.strip() or None, calls


_PARSERS = {"hermes": _hermes, "llama3_json": _llama3_json, "mistral": _mistral}


def tool_message(text: str, choice: ToolChoice | None, parser: str | None, finish_reason: str) -> tuple[dict[str, Any], str]:
    """The assistant message and finish_reason of an answer to a request with tools (vLLM's rules: `tool_calls`
    when auto called a tool or required ended its calls; a named call keeps `stop`). A forced answer cut by
    max_tokens does not parse: it is answered as content, with its `length`."""
    if choice == "required" or isinstance(choice, NamedToolChoice):
        try:
            calls = forced_calls(text, choice)
        except (json.JSONDecodeError, KeyError, TypeError):
            return {"role": "assistant", "content": text}, finish_reason
        reason = "tool_calls" if choice == "required" and finish_reason == "stop" else finish_reason
        return {"role": "assistant", "content": "", "tool_calls": calls}, reason
    content, calls = parse_tool_calls(parser, text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def render_with_tools(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The prompt text of a conversation offered `tools`, by the model's own chat template; ValueError when the
    template refuses the conversation."""
    from jinja2.exceptions import TemplateError
    from tunepipe.tasks.lm.encoding import data_messages  # lazy: kept off `tunepipe` start-up

    try:
        return tokenizer.apply_chat_template(data_messages(tokenizer, messages), tools=tools, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:
        raise ValueError(f"the chat template refuses this conversation with tools: {exc}") from None
