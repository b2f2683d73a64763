"""tool_choice `required` and a named function through the real engine, whose grammar
(structured output) constrains a tiny random-weight model that would never write a call on
its own: every forced call must parse and match its tool's schema, whatever is sampled.

Needs the engine to apply `SamplingParams.structured_output` (serve/structured_output.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from flax import nnx
from test_openai_server import running
from test_tool_chat_template import qwen_tokenizer
from test_tool_server import collect_stream

from tandem.model import ModelConfig, Transformer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.json_prefix import scan
from tandem.serve.openai_server import build_app

MODEL = "tiny"

# Bounded where a random model would otherwise run on (free strings, long digit runs).
PARAMETERS = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "get_time": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 5}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    "ping": None,  # no parameters: an empty object
}
TOOLS = [
    {"type": "function", "function": {"name": name, **({"parameters": p} if p else {})}}
    for name, p in PARAMETERS.items()
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def at_once(create, seeds):
    """The responses of `create(seed)` for every seed, sent together (one engine batch)."""
    with ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(create, seeds))


def check_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    schema = PARAMETERS[call.function.name] or {"type": "object", "maxProperties": 0}
    jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.fixture(scope="module")
def client():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(2))
    config = EngineConfig(
        page_size=16, max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512
    )
    engine = AsyncEngine(Engine(model, qwen_tokenizer(), config, model_name=MODEL))
    with running(build_app(engine)) as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as c:
            yield c
    engine.shutdown()


@pytest.mark.parametrize("name", list(PARAMETERS))
def test_a_named_function_always_gets_valid_arguments(client, name):
    choice = {"type": "function", "function": {"name": name}}
    responses = at_once(
        lambda seed: client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            seed=seed,
            temperature=1.0,
            max_tokens=200,
        ),  # fmt: skip
        range(8),
    )
    for r in responses:
        [c] = r.choices
        assert c.finish_reason == "stop", c
        assert c.message.content is None
        [call] = c.message.tool_calls
        assert call.function.name == name
        check_call(call)


def test_required_without_parallel_calls_always_gets_one_valid_call(client):
    responses = at_once(
        lambda seed: client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            temperature=1.0,
            max_tokens=300,
            parallel_tool_calls=False,
        ),  # fmt: skip
        range(8),
    )
    for r in responses:
        [c] = r.choices
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None
        [call] = c.message.tool_calls
        check_call(call)


def test_required_with_parallel_calls_gets_valid_calls(client):
    """The list has no maxItems (as vLLM), so a random model may write calls until the
    length cap: such an output is content (it does not parse), but a prefix of a valid
    list; the ones that end are valid calls."""
    num_finished = 0
    responses = at_once(
        lambda seed: client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            seed=seed,
            temperature=1.0,
            max_tokens=250,
        ),  # fmt: skip
        range(8),
    )
    for r in responses:
        [c] = r.choices
        if c.finish_reason == "length":
            assert c.message.tool_calls is None
            scan(c.message.content, 0)  # raises if no continuation is valid JSON
            continue
        num_finished += 1
        assert c.finish_reason == "tool_calls", c
        assert c.message.content is None and len(c.message.tool_calls) >= 1
        for call in c.message.tool_calls:
            check_call(call)
    assert num_finished >= 1


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_stream_equals_non_stream(client, tool_choice):
    # One call at most: greedy decoding of an unbounded list may run to the length cap.
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                  temperature=0.0, max_tokens=300, parallel_tool_calls=False)  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finishes = collect_stream(client.chat.completions.create(**kwargs, stream=True))
    assert content is None and full.message.tool_calls
    assert [(n, a) for _, n, a in calls] == [
        (t.function.name, t.function.arguments) for t in full.message.tool_calls
    ]
    assert finishes == [full.finish_reason]
