"""The OpenAI server, driven by the official `openai` client over real HTTP.

A uvicorn server on 127.0.0.1 runs in a thread of the test process over the real engine
and a tiny random model (the byte tokenizer), so every request takes the whole path:
pydantic, tokenization, the engine thread, SSE. Greedy requests make texts comparable;
`ignore_eos` makes lengths exact. A fake engine stands in where the real one cannot be
made to fail (a crashing step, a full queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import AsyncEngine
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.openai_server import build_app
from tandem.serve.sampling_params import SamplingParams

MODEL = "tiny"
MAX_MODEL_LEN = 128
PAGE_SIZE = 16
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@contextlib.contextmanager
def running(app):
    """Serves `app` with uvicorn on a free port in a background thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def raw_engine():
    cfg = ModelConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2,
    )  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    config = EngineConfig(
        page_size=PAGE_SIZE, max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
        max_num_batched_tokens=128,
    )  # fmt: skip
    return Engine(model, byte_tokenizer(), config, model_name=MODEL)


@pytest.fixture(scope="module")
def engine(raw_engine):
    async_engine = AsyncEngine(raw_engine)
    yield async_engine
    async_engine.shutdown()


@pytest.fixture
def slow_steps(raw_engine, monkeypatch):
    """50 ms more per engine step (a step decodes up to `num_decode_steps` = 8 tokens), so a
    request of 100 tokens takes over 0.6 s: it outlives a client's patience of 0.3 s."""
    step = raw_engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(raw_engine, "step", slow_step)


@pytest.fixture(scope="module")
def url(engine):
    with running(build_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def encode(text: str) -> list[int]:
    return byte_tokenizer().encode(text)


def wait_idle(engine: AsyncEngine, timeout: float = 10.0) -> dict:
    """The engine's stats once no request holds pages (or the last seen, on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if (idle and stats["kv_usage"] == 0.0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_models_and_health(client, url):
    [card] = client.models.list().data
    assert card.id == MODEL
    assert httpx.get(f"{url}/health").status_code == 200


def test_completion_usage_arithmetic(client):
    prompt = "Hello, tandem!"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, **GREEDY)
    [choice] = r.choices
    assert choice.finish_reason == "length"
    # 14 prompt bytes + 5 generated tokens = 19.
    assert r.usage.prompt_tokens == len(encode(prompt)) == 14
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == 19
    # Token ids in, the same completion out.
    r2 = client.completions.create(model=MODEL, prompt=encode(prompt), max_tokens=5, **GREEDY)
    assert r2.choices[0].text == choice.text
    assert r2.usage.prompt_tokens == 14


def test_cached_tokens_on_a_repeated_prompt(client):
    prompt = "A long prompt that fills more than two pages of sixteen tokens: " * 2  # 130 bytes
    prompt = prompt[:45]
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Two full pages of the 45-token prompt are reused: 2 * 16 = 32.
    assert second.usage.prompt_tokens_details.cached_tokens == 32
    assert second.usage.prompt_tokens == 45  # cached tokens still count as prompt tokens
    assert second.choices[0].text == first.choices[0].text


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt="Streaming test", max_tokens=12, **GREEDY)
    full = client.completions.create(**kwargs)
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == ["length"]
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    kwargs = dict(model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    tok = byte_tokenizer()
    template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(template, add_special_tokens=False)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.total_tokens == len(prompt_ids) + 10

    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_batch_of_prompts(client):
    prompts = ["first prompt", "second"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, n=2, **GREEDY)
    # Choice p * n + i is the i-th completion of prompt p.
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 12 + 6 and r.usage.completion_tokens == 4 * 3
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, **GREEDY)
        texts = [c.text for c in r.choices if c.index // 2 == p]
        assert texts == [alone.choices[0].text] * 2  # greedy: both samples agree


def test_n_with_seed(client):
    kwargs = dict(model=MODEL, prompt="Once upon", max_tokens=8, n=3, temperature=1.0)
    a = client.completions.create(**kwargs, seed=7)
    b = client.completions.create(**kwargs, seed=7)
    c = client.completions.create(**kwargs, seed=8)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert len(set(texts(a))) == 3  # the n samples of one seed differ
    assert texts(a) == texts(b)  # the same seed repeats them
    assert texts(a) != texts(c)
    assert a.usage.prompt_tokens == len(encode("Once upon"))  # the prompt counts once

    # Streamed with the seed, every index comes back with the same text.
    streamed = {i: "" for i in range(3)}
    for chunk in client.completions.create(**kwargs, seed=7, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert [streamed[i] for i in range(3)] == texts(a)


def test_n_larger_than_the_batch_is_served_and_the_server_keeps_serving(client):
    """n: 65 on an engine of 64 slots (a GRPO group size too): the members that do not
    fit run in a later step; every completion comes back and the server goes on."""
    big = client.completions.create(
        model=MODEL, prompt="group", max_tokens=3, n=65, temperature=1.0, seed=3, **{
            "extra_body": {"ignore_eos": True}
        },
    )  # fmt: skip
    assert sorted(ch.index for ch in big.choices) == list(range(65))
    assert big.usage.completion_tokens == 65 * 3
    after = client.completions.create(model=MODEL, prompt="next", max_tokens=2, **GREEDY)
    assert after.choices[0].finish_reason == "length"


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Log", max_tokens=4, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text  # byte tokens: their texts concatenate
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0.0
        # 3 alternatives plus the chosen one; tokens decoding to one string share a key.
        assert 1 <= len(top) <= 4
        assert all(v <= 0.0 for v in top.values())
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy takes the argmax
    assert lp.text_offset == [0, 1, 2, 3]


def test_chat_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
        logprobs=True, top_logprobs=5, **GREEDY,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 5
        assert values == sorted(values, reverse=True) and values[0] <= 0.0
        assert entry.logprob == pytest.approx(values[0], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())


BAD_REQUESTS = [
    ("completions", "{not json", "malformed"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, "model"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_MODEL_LEN}, "context"),
    ("completions", {"model": MODEL, "prompt": [1] * (MAX_MODEL_LEN + 1)}, "context"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "n": "2"}, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"model": MODEL, "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("completions", {"model": MODEL, "prompt": [100000]}, "prompt token ids"),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     "role"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function"}]}, "tools"),
]  # fmt: skip


@pytest.mark.parametrize("endpoint,body,mentions", BAD_REQUESTS)
def test_bad_request_is_400_and_the_server_keeps_serving(url, client, endpoint, body, mentions):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        f"{url}/v1/{endpoint}", content=content, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert mentions in error["message"] or mentions == error["param"], error
    ok = client.completions.create(model=MODEL, prompt="still alive", max_tokens=2, **GREEDY)
    assert ok.choices[0].finish_reason == "length"


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", logprobs=30)
    assert e.value.status_code == 400 and e.value.body["param"] == "logprobs"


def test_disconnect_mid_stream_aborts(url, engine, slow_steps):
    body = {"model": MODEL, "prompt": "abandoned", "max_tokens": 100, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "user": "quitter"}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    # The connection is closed after the first chunk: the request is aborted.
    stats = wait_idle(engine)
    assert stats["kv_usage"] == 0.0 and stats["num_running"] == 0
    assert stats["clients"]["quitter"]["generated_tokens"] < 100
    metrics = httpx.get(f"{url}/metrics").text
    assert 'tandem:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0' in metrics


def test_disconnect_while_waiting_for_a_non_streamed_completion_aborts(url, engine, slow_steps):
    body = {"model": MODEL, "prompt": "impatient", "max_tokens": 110, "temperature": 0.0,
            "ignore_eos": True, "user": "impatient"}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    stats = wait_idle(engine)
    assert stats["kv_usage"] == 0.0 and stats["num_running"] == 0
    assert stats["clients"]["impatient"]["generated_tokens"] < 110
    assert 'status="500"' not in httpx.get(f"{url}/metrics").text  # the handler ended cleanly


def test_64_concurrent_streams(url, engine, client):
    prompts = [f"Concurrent prompt number {i}" for i in range(64)]

    async def one(aclient, prompt):
        text, finishes, usage = "", [], None
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )  # fmt: skip
        async for chunk in stream:
            for ch in chunk.choices:
                text += ch.text
                finishes += [ch.finish_reason] if ch.finish_reason else []
            usage = chunk.usage or usage
        return text, finishes, usage

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120
        ) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    results = asyncio.run(main())
    for prompt, (_, finishes, usage) in zip(prompts, results):
        assert finishes == ["length"]
        assert usage.completion_tokens == 8 and usage.prompt_tokens == len(encode(prompt))
    # Batched greedy decoding gives what a request alone gets.
    for i in (0, 31, 63):
        alone = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8, **GREEDY)
        assert results[i][0] == alone.choices[0].text
    assert wait_idle(engine)["kv_usage"] == 0.0


def test_metrics_and_client_accounting(url, client, engine):
    client.completions.create(model=MODEL, prompt="metered", max_tokens=3, user="bob", **GREEDY)
    text = httpx.get(f"{url}/metrics").text
    # vLLM's names under tandem: (tests/serve/test_metrics.py checks their values); tandem's
    # own under tandem_.
    for name in (
        "tandem:num_requests_running",
        "tandem:num_requests_waiting",
        "tandem:kv_cache_usage_perc",
        "tandem:prefix_cache_hits_total",
        "tandem:time_to_first_token_seconds_bucket",
        "tandem:inter_token_latency_seconds_bucket",
        'tandem:request_success_total{engine="0",finished_reason="length",model_name="tiny"}',
        'tandem_generation_tokens_total{client="bob"}',
        'tandem_prompt_tokens_total{client="bob"} 7.0',
        'tandem_request_errors_total{status="400"}',
    ):
        assert name in text, name
    assert engine.stats()["clients"]["bob"]["generated_tokens"] >= 3


def test_api_keys(engine):
    app = build_app(engine, api_keys={"sk-alice": "alice", "sk-bob": "bob"})
    with running(app) as base:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(f"{base}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-alice", max_retries=0) as c:
            c.completions.create(model=MODEL, prompt="keyed", max_tokens=1, **GREEDY)
        assert engine.stats()["clients"]["alice"]["prompt_tokens"] == len(encode("keyed"))
        assert httpx.get(f"{base}/health").status_code == 200  # not behind the key


def test_async_engine_generate():
    fake = FakeEngine(byte_tokenizer())
    fake.step_delay = 0.005
    async_engine = AsyncEngine(fake)

    async def main():
        # The fake continues with "abc...", one token per output.
        outs = [o async for o in async_engine.generate("a", [104], SamplingParams(max_tokens=3))]
        assert [o.outputs[0].new_text for o in outs] == ["a", "b", "c"]
        assert [o.finished for o in outs] == [False, False, True]
        # add_request's errors come before the first output.
        with pytest.raises(ValueError, match="empty"):
            await anext(async_engine.generate("b", [], SamplingParams()))
        # A consumer that stops early, or is cancelled, aborts its request.
        gen = async_engine.generate("c", [104], SamplingParams(max_tokens=200))
        await anext(gen)
        await gen.aclose()

        async def consume():
            async for _ in async_engine.generate("d", [104], SamplingParams(max_tokens=200)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while fake.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not fake.requests  # both aborted, not run to 200 tokens
    assert fake.service["default"]["generated_tokens"] < 3 + 2 * 200
    async_engine.shutdown()


def test_queue_full_is_429():
    fake = FakeEngine(byte_tokenizer(), max_waiting=0, max_running=0)
    async_engine = AsyncEngine(fake)
    with running(build_app(async_engine)) as base:
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    async_engine.shutdown()


def test_a_crashed_engine_fails_requests_and_health():
    fake = FakeEngine(byte_tokenizer())
    fake.fail_at_step = 3
    async_engine = AsyncEngine(fake)
    with running(build_app(async_engine)) as base:
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        stream = c.completions.create(model="fake", prompt="x", max_tokens=50, stream=True)
        with pytest.raises(openai.APIError, match="engine step failed"):
            for _ in stream:
                pass
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model="fake", prompt="x", max_tokens=5)
        assert e.value.status_code == 503
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "injected" in health.json()["error"]["message"]
        assert "tandem_engine_alive 0.0" in httpx.get(f"{base}/metrics").text
