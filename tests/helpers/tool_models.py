"""A tiny Qwen2.5 model whose tokenizer carries the published chat template *with* its tool branches.

`families.py` keeps each family's template without tool branches (training renders conversations); serving
tool calls needs the template that renders `tools` and earlier `tool_calls`, and the `<tool_call>` markers
as the published tokenizer has them (added tokens, "special": false).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.helpers.families import FAMILIES, build_family_model

# Qwen/Qwen2.5-0.5B-Instruct, tokenizer_config.json `chat_template` (verbatim, tool branches included).
QWEN25_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""



def _long_context_qwen2(ids, vocab):
    # The template's tool instructions are ~800 tokens under the tiny 420-token vocabulary: more than TINY's 512
    config = FAMILIES["qwen2.5"].config(ids, vocab)
    config.max_position_embeddings = 2048
    return config


QWEN25_TOOLS = replace(FAMILIES["qwen2.5"], name="qwen2.5-tools", template=QWEN25_TOOLS_TEMPLATE,
                       added=["<tool_call>", "</tool_call>"], config=_long_context_qwen2)


def qwen25_tools_model(path: Path) -> Path:
    """A tiny random Qwen2.5 (head size 32, so vLLM's CPU attention serves it) with the tool-calling template."""
    return build_family_model(QWEN25_TOOLS, path)
