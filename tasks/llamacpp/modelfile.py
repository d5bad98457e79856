"""An Ollama Modelfile for a GGUF: FROM, the chat template as Ollama's Go TEMPLATE, the pipeline's stop
tokens, the default system prompt, num_ctx.

A Jinja chat template cannot be translated to Go in general, so the translation goes through what the
template renders: conversations of sentinel strings are rendered with the model's own template (as training
renders them), and the text between sentinels is each turn's framing:

    [system S, user U, assistant A, user V] + generation prompt
      = head_system S sys_to_user U user_to_assistant A assistant_to_user V generation

    [user U] + generation prompt = head U generation      (the template's own default system, if any, is in head)

The Go template replays those pieces over Ollama's `.System` and `.Messages`. Every conversation of that
shape renders in Ollama to the same text as training's template (`render` below replays the Go template's
logic on the pieces, and the export checks that against the Jinja rendering). A template that cannot be
decomposed this way (it moves or refuses the system message) gets the no-system form, and the card says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable

SENTINELS = {"system": "\x02SYS\x03", "user": "\x02USR\x03", "assistant": "\x02AST\x03", "user2": "\x02USR2\x03"}


@dataclass(frozen=True)
class TemplatePieces:
    head: str  # before the first user message, without a system message
    head_system: str | None  # before the system message (None: the template cannot take one)
    sys_to_user: str | None
    user_to_assistant: str
    assistant_to_user: str
    generation: str  # after the last user message: the assistant's header


def _split(text: str, order: list[str]) -> list[str] | None:
    """The text between the sentinels of `order`, when they occur once each, in that order."""
    parts, rest = [], text
    for name in order:
        sentinel = SENTINELS[name]
        if rest.count(sentinel) != 1:
            return None
        before, rest = rest.split(sentinel)
        parts.append(before)
    return parts + [rest]


def template_pieces(render: Callable[[list[dict[str, str]]], str]) -> TemplatePieces:
    """`render(messages)` renders with the generation prompt (the model's chat template, as training does)."""
    s = SENTINELS
    chat = [{"role": "user", "content": s["user"]}, {"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]}]
    turns = _split(render(chat), ["user", "assistant", "user2"])
    if turns is None:
        raise ValueError("the chat template does not render user/assistant turns in order: no Ollama TEMPLATE can replay it")
    head, user_to_assistant, assistant_to_user, generation = turns
    head_system = sys_to_user = None
    try:
        with_system = _split(render([{"role": "system", "content": s["system"]}, *chat]), ["system", "user", "assistant", "user2"])
    except Exception:  # the template refuses a system message (Gemma 2)
        with_system = None
    if with_system is not None and with_system[2:] == [user_to_assistant, assistant_to_user, generation]:
        head_system, sys_to_user = with_system[0], with_system[1]
    return TemplatePieces(head, head_system, sys_to_user, user_to_assistant, assistant_to_user, generation)


def _go(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: TemplatePieces) -> str:
    """No `{{-` trim markers: the pieces' own whitespace (ChatML's newlines) must survive; the actions sit
    back to back, so there is no template whitespace to trim."""
    system = (f"{{{{ if .System }}}}{_go(p.head_system)}{{{{ .System }}}}{_go(p.sys_to_user)}{{{{ else }}}}{_go(p.head)}{{{{ end }}}}"
              if p.head_system is not None else _go(p.head))
    return (
        system
        + "{{ range .Messages }}"
        + '{{ if eq .Role "user" }}{{ .Content }}'
        + f'{{{{ else if eq .Role "assistant" }}}}{_go(p.user_to_assistant)}{{{{ .Content }}}}{_go(p.assistant_to_user)}'
        + "{{ end }}{{ end }}"
        + _go(p.generation)
    )


def render(p: TemplatePieces, system: str | None, messages: list[dict[str, str]]) -> str:
    """What Ollama renders from `go_template(p)` for a conversation (system + alternating user/assistant turns
    ending on a user turn): the same concatenation, for checking against the Jinja rendering."""
    out = (p.head_system + system + p.sys_to_user) if system and p.head_system is not None else p.head
    for m in messages:
        out += m["content"] if m["role"] == "user" else p.user_to_assistant + m["content"] + p.assistant_to_user
    return out + p.generation


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('text holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(*, gguf_name: str, pieces: TemplatePieces, stops: list[str], system_prompt: str | None, num_ctx: int,
              adapter: str | None = None) -> str:
    """`adapter`: a GGUF LoRA applied on top of `gguf_name` (Ollama's ADAPTER)."""
    lines = [f"FROM ./{gguf_name}"] + ([f"ADAPTER ./{adapter}"] if adapter else []) + [f"TEMPLATE {_quote(go_template(pieces))}"]
    if system_prompt and pieces.head_system is not None:
        lines.append(f"SYSTEM {_quote(system_prompt)}")
    lines += [f"PARAMETER stop {_json_str(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"


def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


INSTRUCTION = re.compile(r"^(FROM|TEMPLATE|SYSTEM|PARAMETER|ADAPTER|LICENSE|MESSAGE)\s+", re.I)


def parse_modelfile(text: str) -> dict[str, Any]:
    """Ollama's Modelfile grammar (instruction + argument; `\"\"\"` multi-line strings; `PARAMETER name value`):
    {"from", "template", "system", "parameters": {name: [values]}}. Raises ValueError on anything else."""
    out: dict[str, Any] = {"parameters": {}}
    rest = text
    while rest.strip():
        rest = rest.lstrip("\n")
        if rest.startswith("#"):
            rest = rest.split("\n", 1)[1] if "\n" in rest else ""
            continue
        match = INSTRUCTION.match(rest)
        if not match:
            raise ValueError(f"not a Modelfile instruction: {rest.splitlines()[0]!r}")
        name, rest = match.group(1).upper(), rest[match.end():]
        if rest.startswith('"""'):
            end = rest.index('"""', 3)
            value, rest = rest[3:end], rest[end + 3:]
        else:
            value, _, rest = rest.partition("\n")
        if name == "PARAMETER":
            key, _, raw = value.strip().partition(" ")
            raw = raw.strip()
            out["parameters"].setdefault(key, []).append(json.loads(raw) if raw.startswith('"') else raw)
        else:
            out[name.lower()] = value
    return out
