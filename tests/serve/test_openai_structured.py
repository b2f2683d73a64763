"""Structured output and logit controls through the OpenAI endpoint, with the official
client and a tiny random-weight model that would never write JSON on its own: every
constrained completion must still parse and validate, whatever the sampled tokens."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
from flax import nnx
from test_openai_server import running

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.openai_server import build_app

MODEL = "tiny"

# Bounded where a random model would otherwise run on (free strings, long digit runs).
SCHEMAS = [
    {"type": "integer", "minimum": -5, "maximum": 120},
    {"type": "boolean"},
    {"enum": ["red", "green", "blue", 7, None]},
    {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "integer", "minimum": 1, "maximum": 50},
        "minItems": 1,
        "maxItems": 4,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -9, "maximum": 9},
                    "y": {"type": "integer", "minimum": -9, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["point", "ok"],
        "additionalProperties": False,
    },
    {"type": "string", "enum": ["alpha", "beta"]},
    {"type": "string", "pattern": "^[a-c]{2,4}$"},
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "high"]}, "n": {"type": "null"}},
        "required": ["level", "n"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def url():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    config = EngineConfig(
        page_size=16, max_model_len=512, max_num_seqs=128, max_num_batched_tokens=256
    )
    engine = AsyncEngine(Engine(model, byte_tokenizer(), config, model_name=MODEL))
    with running(build_app(engine)) as base:
        yield base
    engine.shutdown()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _gather(url, requests):
    """Runs `requests` (kwargs of chat.completions.create) at once: one batch."""

    async def go():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        out = await asyncio.gather(*(aclient.chat.completions.create(**r) for r in requests))
        await aclient.close()
        return out

    return asyncio.run(go())


def _chat(schema_index, seed):
    schema = SCHEMAS[schema_index]
    return dict(
        model=MODEL,
        messages=[{"role": "user", "content": f"answer {seed}"}],
        max_tokens=300,
        temperature=1.0,
        seed=seed,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": f"s{schema_index}", "schema": schema, "strict": True},
        },
    )


def test_a_hundred_json_schema_requests_all_validate(url):
    requests = [_chat(i % len(SCHEMAS), seed) for seed, i in enumerate(range(100))]
    responses = _gather(url, requests)
    for i, r in enumerate(responses):
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])


def test_regex_choice_and_json_object(url, client):
    pattern = r"[a-d]{2}-[0-9]{1,3}(!|\?)"
    regex = [
        dict(model=MODEL, messages=[{"role": "user", "content": "id"}], max_tokens=50,
             seed=s, extra_body={"structured_outputs": {"regex": pattern}})
        for s in range(10)
    ]  # fmt: skip
    choices = ["north", "south", "east west"]
    choice = [
        dict(model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=50,
             seed=s, extra_body={"guided_choice": choices})
        for s in range(10)
    ]  # fmt: skip
    obj = [
        dict(model=MODEL, messages=[{"role": "user", "content": "obj"}], max_tokens=150,
             seed=s, response_format={"type": "json_object"})
        for s in range(3)
    ]  # fmt: skip
    responses = _gather(url, regex + choice + obj)
    texts = [r.choices[0].message.content for r in responses]
    for text in texts[:10]:
        assert re.fullmatch(pattern, text), text
    for text in texts[10:20]:
        assert text in choices
    # A random model in a free-form object may run out of tokens; those that finish parse.
    finished = [
        t for t, r in zip(texts[20:], responses[20:]) if r.choices[0].finish_reason == "stop"
    ]
    assert finished
    assert all(isinstance(json.loads(t), dict) for t in finished)


def test_completions_take_structured_output_and_a_seed_repeats(client):
    kwargs = dict(
        model=MODEL, prompt="x=", max_tokens=100, seed=7, temperature=1.0,
        extra_body={"guided_json": SCHEMAS[6]},
    )  # fmt: skip
    first = client.completions.create(**kwargs).choices[0].text
    again = client.completions.create(**kwargs).choices[0].text
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices
    )
    assert first == again == streamed
    jsonschema.validate(json.loads(first), SCHEMAS[6])


def test_streamed_chat_equals_the_whole_response(client):
    kwargs = _chat(4, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(**kwargs, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(whole), SCHEMAS[4])


@pytest.mark.parametrize(
    "extra, field",
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "nope",
        ),  # noqa: E501
        ({"extra_body": {"guided_regex": "(unclosed"}}, "regex"),
        ({"extra_body": {"guided_choice": []}}, "choice"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"extra_body": {"allowed_token_ids": [5, 384]}}, "allowed_token_ids"),
        ({"extra_body": {"min_tokens": 50}}, "min_tokens"),
    ],
)
def test_bad_constraints_are_400s_and_the_next_request_is_served(client, extra, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, **extra
        )
    assert field in str(e.value)
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_min_tokens_and_bad_words(client):
    z = ord("Z")  # the byte tokenizer's id of "Z"
    biased = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=6, temperature=0.0, logit_bias={str(z): 100}
    )
    assert biased.choices[0].text == "ZZZZZZ"
    allowed = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=12, temperature=1.0, seed=0,
        extra_body={"allowed_token_ids": [ord("a"), ord("b")]},
    )  # fmt: skip
    assert set(allowed.choices[0].text) <= {"a", "b"}
    # Greedy "Z"s, with the word "ZZ" banned: after a "Z" another may not follow.
    banned = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=8, temperature=0.0, logit_bias={str(z): 100},
        extra_body={"bad_words": ["ZZ"]},
    )  # fmt: skip
    text = banned.choices[0].text
    assert "ZZ" not in text and text.count("Z") == 4, text
    # min_tokens: "Z" is a stop token that the greedy, biased row would sample first.
    short = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=8, temperature=0.0, logit_bias={str(z): 100},
        extra_body={"stop_token_ids": [z]},
    )  # fmt: skip
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens == 1
    held = client.completions.create(
        model=MODEL, prompt="abc", max_tokens=8, temperature=0.0, logit_bias={str(z): 100},
        extra_body={"stop_token_ids": [z], "min_tokens": 5},
    )  # fmt: skip
    assert held.choices[0].finish_reason == "stop" and held.usage.completion_tokens == 6
