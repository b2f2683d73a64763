"""Chat messages and tools -> the prompt's text, through the tokenizer's chat template
(`apply_chat_template(messages, tools=...)`).

Messages reach the template as HF's chat format: `role` and `content` (text parts joined, a
null content as ""), `name` when given, an assistant turn's `tool_calls` and a tool turn's
`tool_call_id`. A call's `arguments` arrive at the template parsed into a dict, as vLLM
passes them: that is what HF documents for tool-use templates, and Llama 3.1's writes them
with `| tojson` (a JSON string there would be quoted twice); Qwen2.5's takes either. Tools
go in as OpenAI sent them (`{"type": "function", "function": {...}}`).
"""

from __future__ import annotations

import json


def template_messages(messages) -> list[dict]:
    """`ChatMessage`s -> the dicts chat templates read."""
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {
                        "name": c.function.name,
                        "arguments": json.loads(c.function.arguments),
                    },
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def template_tools(tools) -> list[dict] | None:
    """`Tool`s -> the JSON schemas templates render; None when there are none."""
    if not tools:
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def render_chat(tokenizer, messages, tools=None, *, add_generation_prompt: bool = True) -> str:
    """The prompt's text. Raises what the template raises (no template, a template that
    refuses the conversation)."""
    kwargs = {"tools": template_tools(tools)} if tools else {}
    return tokenizer.apply_chat_template(
        template_messages(messages),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **kwargs,
    )
