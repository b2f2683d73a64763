"""Tool calling through the real HTTP app and the official `openai` client, over a scripted
engine: the fake engine's contract, but every completion writes a given text, one byte token
per step (so a stream arrives one character at a time). The byte tokenizer carries a
Qwen-style template (tests/serve/test_tool_chat_template.py), which selects `hermes`;
other families are selected with the server's `tool_call_parser`."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from test_openai_server import running
from test_tool_chat_template import WEATHER_TOOL, qwen_tokenizer

from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.openai_server import build_app
from tandem.serve.tool_calls import required_schema

TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "Weather in Paris?"}]

SCRIPTS = {
    "hermes": 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris"}}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
}
CONTENT = {"hermes": "Let me check.\n", "llama3_json": None, "mistral": None}


class ScriptedEngine(FakeEngine):
    """Every completion writes `script` (ASCII) and stops; records each request."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, max_model_len=4096)
        self.script = ""
        self.params = []  # each request's SamplingParams
        self.prompts = []

    def add_request(self, request_id, prompt_token_ids, params, **kwargs):
        self.params.append(params)
        self.prompts.append(list(prompt_token_ids))
        super().add_request(request_id, prompt_token_ids, params, **kwargs)

    def _grow(self, req, c):
        c.token_ids.append(ord(self.script[len(c.token_ids)]))
        c.text += self.script[len(c.token_ids) - 1]
        self.service[req.client]["generated_tokens"] += 1
        if len(c.token_ids) == len(self.script):
            c.finish_reason = "stop"
        elif len(c.token_ids) >= req.params.max_tokens:
            c.finish_reason = "length"


@pytest.fixture(scope="module")
def fake():
    return ScriptedEngine(qwen_tokenizer())


@pytest.fixture(scope="module")
def engine(fake):
    async_engine = AsyncEngine(fake)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def urls(engine):
    """A server per tool parser: hermes from the template, the others by name."""
    with (
        running(build_app(engine)) as hermes,
        running(build_app(engine, tool_call_parser="llama3_json")) as llama,
        running(build_app(engine, tool_call_parser="mistral")) as mistral,
    ):
        yield {"hermes": hermes, "llama3_json": llama, "mistral": mistral}


def client_of(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def collect_stream(stream):
    """(content, calls [(id, name, arguments)], finish reasons) of a streamed choice 0,
    checking the deltas' shape on the way."""
    content, calls, finishes = "", {}, []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                if d.index not in calls:
                    assert d.id and d.type == "function" and d.function.name
                    calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index][2] += d.function.arguments
            finishes += [choice.finish_reason] if choice.finish_reason else []
    return content or None, [tuple(c) for c in calls.values()], finishes


@pytest.mark.parametrize("family", ["hermes", "llama3_json", "mistral"])
def test_auto_returns_the_models_tool_call(urls, fake, family):
    fake.script = SCRIPTS[family]
    with client_of(urls[family]) as client:
        r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        [choice] = r.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == CONTENT[family]
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert len(call.id) == 9 if family == "mistral" else call.id.startswith("call_")
        # Mistral's marker is a special token: decoding keeps special tokens (as vLLM).
        assert fake.params[-1].skip_special_tokens == (family != "mistral")
        assert fake.params[-1].structured_output is None

        stream = client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, stream=True
        )
        content, calls, finishes = collect_stream(stream)
        assert content == CONTENT[family]
        assert [(n, a) for _, n, a in calls] == [("get_weather", call.function.arguments)]
        assert finishes == ["tool_calls"]


def test_text_without_a_call_is_content(urls, fake):
    fake.script = "It is sunny in Paris."
    with client_of(urls["hermes"]) as client:
        r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        assert r.choices[0].message.content == fake.script
        assert r.choices[0].message.tool_calls is None
        assert r.choices[0].finish_reason == "stop"
        content, calls, finishes = collect_stream(
            client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, stream=True)
        )
        assert (content, calls, finishes) == (fake.script, [], ["stop"])


def test_parallel_calls_and_parallel_tool_calls_false(urls, fake):
    one = SCRIPTS["hermes"].removeprefix("Let me check.\n")
    fake.script = (
        one + "\n" + one.replace("get_weather", "get_time").replace('{"city": "Paris"}', "{}")
    )
    with client_of(urls["hermes"]) as client:
        r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        names = [c.function.name for c in r.choices[0].message.tool_calls]
        assert names == ["get_weather", "get_time"]
        assert r.choices[0].message.content is None
        _, calls, _ = collect_stream(
            client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, stream=True)
        )
        assert [(n, a) for _, n, a in calls] == [
            ("get_weather", '{"city": "Paris"}'),
            ("get_time", "{}"),
        ]
        r = client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, parallel_tool_calls=False
        )
        assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_choice_none_renders_the_tools_and_parses_nothing(urls, fake):
    fake.script = SCRIPTS["hermes"]
    with client_of(urls["hermes"]) as client:
        r = client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, tool_choice="none"
        )
    assert r.choices[0].message.content == fake.script
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    prompt = byte_tokenizer().decode(fake.prompts[-1])
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in prompt


def test_a_conversation_continues_with_the_calls_and_their_results(urls, fake):
    fake.script = SCRIPTS["hermes"]
    with client_of(urls["hermes"]) as client:
        r = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        message = r.choices[0].message
        [call] = message.tool_calls
        # The client's own message object goes back, as OpenAI's examples do.
        messages = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
        fake.script = "18C in Paris."
        r = client.chat.completions.create(model="fake", messages=messages, tools=TOOLS)
    assert r.choices[0].message.content == "18C in Paris."
    prompt = byte_tokenizer().decode(fake.prompts[-1])
    assert (
        "<|im_start|>assistant\nLet me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
    ) in prompt


def test_named_function_is_constrained_to_its_parameters(urls, fake):
    fake.script = '{"city": "Paris"}'  # what the grammar lets the model write
    choice = {"type": "function", "function": {"name": "get_weather"}}
    with client_of(urls["hermes"]) as client:
        r = client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, tool_choice=choice
        )
        params = fake.params[-1].structured_output
        assert json.loads(params.json) == WEATHER_TOOL["function"]["parameters"]
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and call.function.arguments == fake.script
        assert r.choices[0].message.content is None
        assert r.choices[0].finish_reason == "stop"  # as vLLM and OpenAI for a named function
        content, calls, finishes = collect_stream(
            client.chat.completions.create(
                model="fake", messages=ASK, tools=TOOLS, tool_choice=choice, stream=True
            )
        )
        assert (content, [(n, a) for _, n, a in calls]) == (None, [("get_weather", fake.script)])
        assert finishes == ["stop"]
        # A function without parameters takes an empty object.
        time_choice = {"type": "function", "function": {"name": "get_time"}}
        client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, tool_choice=time_choice
        )
        assert json.loads(fake.params[-1].structured_output.json) == {
            "type": "object",
            "properties": {},
        }


@pytest.mark.parametrize("parallel", [True, False])
def test_required_is_constrained_to_a_list_of_calls(urls, fake, parallel):
    fake.script = '[{"name": "get_weather", "parameters": {"city": "Paris"}}]'
    with client_of(urls["llama3_json"]) as client:
        kwargs = dict(model="fake", messages=ASK, tools=TOOLS, tool_choice="required")
        r = client.chat.completions.create(**kwargs, parallel_tool_calls=parallel)
        schema = json.loads(fake.params[-1].structured_output.json)
        assert schema == required_schema(TOOLS, parallel)
        assert ("maxItems" in schema) == (not parallel)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather"
        assert call.function.arguments == '{"city": "Paris"}'
        assert r.choices[0].finish_reason == "tool_calls"
        _, calls, finishes = collect_stream(client.chat.completions.create(**kwargs, stream=True))
        assert [(n, a) for _, n, a in calls] == [("get_weather", '{"city": "Paris"}')]
        assert finishes == ["tool_calls"]


def bad(name="get_weather", **function):
    return {"type": "function", "function": {"name": name, **function}}


BAD_REQUESTS = [
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [bad("get weather")]}, "get weather"),
    ({"tools": [WEATHER_TOOL, bad(parameters={"type": "objekt"})]}, "tools.1.function.parameters"),
    ({"tools": [bad(parameters={"type": "objekt"})]}, "'get_weather'"),
    ({"tools": [WEATHER_TOOL, WEATHER_TOOL]}, "get_weather is given twice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_news"}}},
     "'get_news'"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "18C"}]}, "tool_call_id"),
]  # fmt: skip


@pytest.mark.parametrize("body,mentions", BAD_REQUESTS)
def test_bad_tools_are_400_and_the_server_keeps_serving(urls, fake, body, mentions):
    url = urls["hermes"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "fake", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert mentions in error["message"] or mentions == error["param"], error
    fake.script = SCRIPTS["hermes"]
    with client_of(url) as client:
        ok = client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
    assert ok.choices[0].finish_reason == "tool_calls"


def test_auto_needs_a_parser(engine, fake):
    scripted = ScriptedEngine(byte_tokenizer())  # a template without tool markers
    plain = AsyncEngine(scripted)
    with running(build_app(plain)) as url, client_of(url) as client:
        with pytest.raises(openai.BadRequestError, match="--tool-call-parser") as e:
            client.chat.completions.create(model="fake", messages=ASK, tools=TOOLS)
        assert e.value.body["param"] == "tool_choice"
        scripted.script = "fine"
        r = client.chat.completions.create(
            model="fake", messages=ASK, tools=TOOLS, tool_choice="none"
        )
        assert r.choices[0].message.content == "fine"
    plain.shutdown()
    with running(build_app(engine, enable_auto_tool_choice=False)) as url, client_of(url) as c:
        with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
            c.chat.completions.create(model="fake", messages=ASK, tools=TOOLS, tool_choice="auto")
