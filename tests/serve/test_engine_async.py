"""The overlapped, multi-step engine against the synchronous one-step engine: the same
outputs on a mixed workload (greedy and seeded sampling, stops, n > 1, logprobs,
penalties, prompt logprobs, preemption, an abort); groups larger than the batch; one
request's failure stays its own."""

import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampling_params import SamplingParams as SP

CFG = ModelConfig(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
)
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def make_engine(model, **kw):
    cfg = dict(page_size=8, max_num_batched_tokens=32, max_num_seqs=8)
    return Engine(model, TOK, EngineConfig(**{**cfg, **kw}))


TEXT = "the quick brown fox jumps over the lazy dog "


def workload(stop="e"):
    """{request id: (prompt, params)}: every feature the engine must keep exact."""
    text = TEXT
    return {
        "greedy": (text, SP(max_tokens=20, temperature=0.0, ignore_eos=True)),
        "seeded": (text[:9], SP(max_tokens=17, temperature=0.9, seed=5, ignore_eos=True)),
        "topk": ("abc", SP(max_tokens=12, temperature=0.7, top_k=5, top_p=0.8, seed=2)),
        "stop": (text, SP(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,))),
        "stop_id": ("xyz", SP(max_tokens=30, temperature=1.0, seed=9, stop_token_ids=(101,))),
        "group": ("a group", SP(n=3, max_tokens=9, temperature=1.0, seed=11, ignore_eos=True)),
        "logprobs": (text[:20], SP(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)),
        "penalty": (
            "aaaa",
            SP(max_tokens=15, temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5),
        ),
        "prompt_lp": (text[:30], SP(max_tokens=2, temperature=0.0, prompt_logprobs=2)),
        "long": (text * 2, SP(max_tokens=40, temperature=0.8, seed=1, ignore_eos=True)),
        "abort": (text, SP(max_tokens=60, temperature=0.0, ignore_eos=True)),
    }


def run(engine, requests, abort_after=None):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, TOK.encode(prompt), params)
    done, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        if steps == abort_after:
            engine.abort("abort")
    return done


def summary(out):
    return [
        (
            c.text,
            c.token_ids,
            c.finish_reason,
            None
            if c.logprobs is None
            else [(lp.token_id, [t for t, _ in lp.top]) for lp in c.logprobs],
        )
        for c in out.outputs
    ]


def test_overlapped_multi_step_engine_equals_the_synchronous_one(model):
    # 18 pages of 8 tokens for 13 sequences of up to 130 tokens: both engines preempt.
    sync = make_engine(model, num_decode_steps=1, async_scheduling=False, num_pages=18)
    fast = make_engine(model, num_decode_steps=4, async_scheduling=True, num_pages=18)
    probe = SP(max_tokens=30, temperature=0.0, ignore_eos=True)
    text = run(sync, {"probe": (TEXT, probe)})["probe"].outputs[0].text
    stop = text[10:12]  # a stop string the greedy text reaches mid-way
    want = run(sync, workload(stop), abort_after=3)
    got = run(fast, workload(stop), abort_after=3)
    assert sync.scheduler.num_preemptions > 0 and fast.scheduler.num_preemptions > 0
    assert set(want) == set(got) == set(workload()) - {"abort"}  # an abort has no output
    for rid in workload():
        if rid == "abort":
            continue
        assert summary(got[rid]) == summary(want[rid]), rid
        w, g = want[rid].outputs[0].logprobs, got[rid].outputs[0].logprobs
        if w is not None:
            np.testing.assert_allclose([x.logprob for x in g], [x.logprob for x in w], atol=1e-5)
    w, g = want["prompt_lp"].prompt_logprobs, got["prompt_lp"].prompt_logprobs
    assert g[0] is None and len(g) == len(w) == len(workload()["prompt_lp"][0])
    np.testing.assert_allclose([x.logprob for x in g[1:]], [x.logprob for x in w[1:]], atol=1e-5)
    stopped = got["stop"].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.index(stop)]
    for engine in (sync, fast):  # every page came back, aborted or not
        assert engine.blocks.num_used_blocks == 0 and not engine.requests


def test_a_group_larger_than_the_batch_runs_over_several_steps(model):
    params = SP(n=11, max_tokens=5, temperature=1.0, seed=4, ignore_eos=True)
    small = run(make_engine(model, max_num_seqs=4), {"g": ("group of eleven", params)})["g"]
    big = run(make_engine(model, max_num_seqs=8), {"g": ("group of eleven", params)})["g"]
    assert [c.index for c in small.outputs] == list(range(11))
    assert [c.token_ids for c in small.outputs] == [c.token_ids for c in big.outputs]
    assert len({tuple(c.token_ids) for c in small.outputs}) > 1


def test_a_failing_request_fails_alone(model, monkeypatch):
    engine = make_engine(model)
    for rid in ("ok", "bad"):
        engine.add_request(rid, TOK.encode(rid), SP(max_tokens=6, temperature=0.0, stop=("~",)))
    bad = engine.requests["bad"].seqs[0]

    def boom(*args, **kwargs):
        raise RuntimeError("detokenizer exploded")

    monkeypatch.setattr(bad.stops, "append", boom)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert "detokenizer exploded" in done["bad"].error
    assert done["bad"].outputs[0].finish_reason == "error"
    assert done["ok"].error is None and len(done["ok"].outputs[0].token_ids) == 6
    assert engine.blocks.num_used_blocks == 0
    # The engine goes on serving.
    engine.add_request("later", TOK.encode("later"), SP(max_tokens=3, temperature=0.0))
    assert engine.run_until_done()["later"].outputs[0].finish_reason == "length"
