"""`ProcessEngine`: the engine loop in a spawned child, behind AsyncEngine's API.

The child builds the tiny preset (random weights, byte tokenizer) from an `EngineSpec`;
greedy outputs are compared with an in-process `LLM` of the same preset, seed and engine
config. Spawned children import JAX (seconds each): one engine is shared by the tests that
leave it alive; the kill and bad-path tests start their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from test_openai_server import running

from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.async_engine import EngineDeadError
from tandem.serve.engine_process import EngineSpec, ProcessEngine, _serve
from tandem.serve.llm import LLM
from tandem.serve.openai_server import build_app
from tandem.serve.sampling_params import SamplingParams

PRESET = "models/tiny.gin"
CONFIG = dict(max_num_seqs=4, max_model_len=128, num_pages=64)
STARTUP_TIMEOUT = 120
PROMPTS = [[72, 101, 108, 108, 111], [84, 97, 110, 100, 101, 109, 33, 32]]  # "Hello", "Tandem! "


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Starts a ProcessEngine; the children share a persistent compilation cache, so
    the second one to build the preset compiles nothing."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))

    def start(source: str = PRESET) -> ProcessEngine:
        with pytest.MonkeyPatch.context() as patch:  # the child inherits the environment
            patch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
            patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
            spec = EngineSpec(source, engine_config=CONFIG)
            return ProcessEngine(spec, startup_timeout=STARTUP_TIMEOUT)

    return start


@pytest.fixture(scope="module")
def started(start):
    """The shared engine and the in-process reference (its greedy outputs per prompt),
    built side by side: the child builds its model while this process builds its own."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(start)
        try:
            reference = LLM(PRESET, **CONFIG).generate(PROMPTS, greedy(12))
        finally:
            engine = future.result()
    yield engine, reference
    engine.shutdown()


@pytest.fixture(scope="module")
def engine(started):
    return started[0]


@pytest.fixture(scope="module")
def reference(started):
    return started[1]


async def collect(engine, request_id, prompt, params) -> list:
    return [out async for out in engine.generate(request_id, prompt, params)]


def wait_idle(engine, timeout: float = 20.0) -> dict:
    """The engine's stats once no request holds pages (or the last seen, on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
        if (idle and stats["kv_usage"] == 0.0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def test_start_up_reports_the_model(engine):
    assert engine.is_running and engine.dead_error is None
    assert engine.model_name == "tiny" and engine.max_model_len == 128
    assert engine.tokenizer.decode(PROMPTS[0]) == "Hello"  # loaded in this process
    assert engine.stats()["num_running"] == 0


def test_a_request_streams_the_in_process_greedy_tokens(engine, reference):
    outs = asyncio.run(collect(engine, "one", PROMPTS[0], greedy(12)))
    assert len(outs) > 1 and [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final, expected = outs[-1].outputs[0], reference[0].outputs[0]
    # The deltas add up to the whole completion, which is the in-process one.
    assert [t for o in outs for t in o.outputs[0].new_token_ids] == final.token_ids
    assert "".join(o.outputs[0].new_text for o in outs) == final.text
    assert final.token_ids == expected.token_ids and len(final.token_ids) == 12
    assert final.text == expected.text and final.finish_reason == "length"


def test_two_concurrent_requests(engine, reference):
    async def both():
        return await asyncio.gather(
            *(collect(engine, f"both-{i}", p, greedy(12)) for i, p in enumerate(PROMPTS))
        )

    for outs, expected in zip(asyncio.run(both()), reference):
        assert outs[-1].outputs[0].token_ids == expected.outputs[0].token_ids


def test_closing_a_stream_aborts_and_the_engine_goes_on(engine, reference):
    async def abandon():
        stream = await engine.add_request("abandoned", PROMPTS[1], greedy(100), client="quitter")
        first = await anext(stream)
        stream.close()
        return first

    assert not asyncio.run(abandon()).finished
    stats = wait_idle(engine)
    assert stats["num_running"] == 0 and stats["kv_usage"] == 0.0  # its pages are back
    assert stats["clients"]["quitter"]["generated_tokens"] < 100
    outs = asyncio.run(collect(engine, "after-abort", PROMPTS[0], greedy(12)))
    assert outs[-1].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_a_bad_request_raises_in_the_parent_and_the_engine_goes_on(engine, reference):
    async def bad():
        await engine.add_request("bad", [1, 10**6], greedy(4))  # vocab is 384

    with pytest.raises(ValueError, match="384"):
        asyncio.run(bad())
    assert engine.is_running
    outs = asyncio.run(collect(engine, "after-bad", PROMPTS[0], greedy(12)))
    assert outs[-1].outputs[0].token_ids == reference[0].outputs[0].token_ids


def test_http_server_over_the_engine_process(engine, reference):
    expected = reference[1].outputs[0].text
    with running(build_app(engine)) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        kwargs = dict(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0.0)
        chunks = list(
            client.completions.create(**kwargs, stream=True, extra_body={"ignore_eos": True})
        )
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length"
        assert client.models.list().data[0].id == "tiny"


def test_the_child_loop_sends_one_message_per_step_and_reports_a_failed_step():
    """The child's loop, on a thread over a fake engine: no process needed."""
    engine = FakeEngine(byte_tokenizer())
    engine.fail_at_step = 3
    command_reader, command_writer = multiprocessing.Pipe(duplex=False)
    output_reader, output_writer = multiprocessing.Pipe(duplex=False)
    loop = threading.Thread(target=_serve, args=(engine, command_reader, output_writer))
    loop.start()
    command_writer.send(
        [("add", "a", [104], greedy(8), "default", 0), ("add", "b", [], greedy(8), "default", 0)]
    )
    kind, added, outputs, stats = output_reader.recv()
    assert kind == "step" and added[0] == ("a", None)
    assert added[1][0] == "b" and isinstance(added[1][1], ValueError)  # refused: empty
    assert [o.request_id for o in outputs] == ["a"] and stats.keys() == engine.stats().keys()
    # The fake's third step raises.
    messages = [output_reader.recv() for _ in range(2)]
    assert [m[0] for m in messages] == ["step", "dead"]
    assert "engine step failed" in messages[-1][1]
    loop.join(5)
    assert not loop.is_alive()


def test_a_killed_engine_process_fails_requests_in_flight(start):
    engine = start()

    async def kill_mid_request():
        stream = await engine.add_request("doomed", PROMPTS[0], greedy(100))
        await anext(stream)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("refused", PROMPTS[0], greedy(4))

    try:
        asyncio.run(kill_mid_request())
        assert not engine.is_running
        assert "killed by SIGKILL" in str(engine.dead_error)
    finally:
        engine.shutdown()


def test_a_bad_model_path_fails_start_up_naming_it(start, tmp_path):
    with pytest.raises(Exception, match="no-such-checkpoint") as e:
        start(str(tmp_path / "no-such-checkpoint"))
    assert isinstance(e.value, FileNotFoundError)  # the child's error type, for callers
    assert "could not start the engine" in str(e.value)
    assert "Traceback" in str(e.value.__cause__)  # the child's, for the log
