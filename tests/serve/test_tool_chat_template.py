"""A multi-turn conversation with tools, tool calls and tool results, rendered by a
Hermes/Qwen2.5-style chat template set on the byte tokenizer (nothing downloaded)."""

from __future__ import annotations

import pytest

from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.chat_template import render_chat, template_messages
from tandem.serve.protocol import ChatCompletionRequest
from tandem.serve.tool_parsers import detect_tool_parser

# Qwen2.5's template in short: the tools in a system turn, calls as <tool_call> JSON (its
# arguments through `tojson`, so a dict renders as JSON and a string would be quoted
# again), results as <tool_response> in a user turn.
QWEN_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Return each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{% for call in message.tool_calls or [] %}{% if not loop.first %}{{ '\\n' }}{% endif %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role != 'system' %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"}]},
    {"role": "assistant", "content": "Paris 18C, Rome 25C."},
    {"role": "user", "content": "Thanks!"},
]  # fmt: skip

EXPECTED = """\
<|im_start|>system
Be brief.

# Tools
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "The weather in a \
city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, \
"required": ["city"]}}}
</tools>
Return each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
<|im_start|>user
Weather in Paris and Rome?<|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Rome"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
18C, sunny
</tool_response><|im_end|>
<|im_start|>user
<tool_response>
25C
</tool_response><|im_end|>
<|im_start|>assistant
Paris 18C, Rome 25C.<|im_end|>
<|im_start|>user
Thanks!<|im_end|>
<|im_start|>assistant
"""


def qwen_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = QWEN_TEMPLATE
    return tok


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": CONVERSATION, "tools": [WEATHER_TOOL], **kwargs}
    )


def test_multi_turn_with_tool_calls_and_results():
    req = request()
    text = render_chat(qwen_tokenizer(), req.messages, req.tools)
    assert text == EXPECTED


def test_arguments_reach_the_template_as_dicts():
    messages = template_messages(request().messages)
    call = messages[2]["tool_calls"][1]
    assert call == {
        "id": "call_2",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Rome"}},
    }
    assert messages[2]["content"] == ""  # null content
    assert messages[3] == {"role": "tool", "content": "18C, sunny", "tool_call_id": "call_1"}
    assert messages[4]["content"] == "25C"


def test_without_tools_the_template_gets_none():
    req = ChatCompletionRequest.model_validate({"messages": CONVERSATION[:2]})
    text = render_chat(qwen_tokenizer(), req.messages, req.tools)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert "<tools>" not in text


def test_the_template_implies_hermes():
    assert detect_tool_parser(qwen_tokenizer()) == "hermes"
    assert detect_tool_parser(byte_tokenizer()) is None


@pytest.mark.parametrize(
    "message,mentions",
    [
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "user", "content": "x", "tool_call_id": "c"}, "tool_call_id"),
        ({"role": "user", "content": "x", "tool_calls": []}, "tool_calls"),
        (
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
             "function": {"name": "f", "arguments": "{not json"}}]},
            "arguments",
        ),
    ],
)  # fmt: skip
def test_bad_tool_messages(message, mentions):
    with pytest.raises(ValueError, match=mentions):
        ChatCompletionRequest.model_validate({"messages": [message]})
