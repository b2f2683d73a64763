"""Engine behaviour a user depends on: stops, n with seeds, logprobs, aborts, bad requests,
and no recompilation after warm-up."""

import numpy as np
import pytest
from flax import nnx

from tandem.model import ModelConfig, Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig, QueueFullError
from tandem.serve.sampling_params import SamplingParams

CFG = ModelConfig(
    vocab_size=384,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
)
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def make_engine(model, **kw):
    cfg = dict(page_size=8, max_num_batched_tokens=32, max_num_seqs=8)
    return Engine(model, TOK, EngineConfig(**{**cfg, **kw}))


def run(engine, requests):
    """requests: {id: (prompt text, params)} -> {id: final RequestOutput}"""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, TOK.encode(prompt), params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_no_recompilation_after_warm_up(model):
    engine = make_engine(model)
    workload = {
        f"w{i}": ("x" * n, SamplingParams(max_tokens=m, temperature=0.0))
        for i, (n, m) in enumerate([(3, 9), (30, 4), (70, 12), (11, 20)])
    }
    before = engine.stats()["num_compiles"]
    # Greedy requests only: the sampler without sort or penalties is all they need.
    warm_up_seconds = engine.warm_up(full=False)
    compiles = engine.stats()["num_compiles"]
    # At most a mixed step per token bucket and a decode call per slot and step bucket;
    # fewer when another engine of this model compiled them already.
    runner = engine.runner
    buckets = len(runner.token_buckets) + len(runner.slot_buckets) * len(runner.step_buckets)
    assert compiles - before <= buckets
    assert warm_up_seconds > 0
    run(engine, workload)
    run(engine, {f"again-{k}": v for k, v in workload.items()})
    assert engine.stats()["num_compiles"] == compiles


def test_stop_strings_stop_ids_and_lengths(model):
    engine = make_engine(model)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    [full] = run(engine, {"f": ("abc", greedy)}).values()
    text, ids = full.outputs[0].text, full.outputs[0].token_ids
    assert full.outputs[0].finish_reason == "length" and len(ids) == 24
    stop = text[5:7]
    cut = text.index(stop)
    res = run(
        engine,
        {
            "s": (
                "abc",
                SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,)),
            ),
            "si": (
                "abc",
                SamplingParams(
                    max_tokens=24,
                    temperature=0.0,
                    ignore_eos=True,
                    stop=(stop,),
                    include_stop_str_in_output=True,
                ),
            ),
            "id": (
                "abc",
                SamplingParams(
                    max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(ids[3],)
                ),
            ),
        },
    )
    assert res["s"].outputs[0].text == text[:cut] and res["s"].outputs[0].finish_reason == "stop"
    assert res["si"].outputs[0].text == text[: cut + len(stop)]
    first = ids.index(ids[3])
    assert res["id"].outputs[0].token_ids == ids[: first + 1]
    assert res["id"].outputs[0].finish_reason == "stop"


def test_streamed_deltas_add_up_to_the_text(model):
    engine = make_engine(model)
    engine.add_request(
        "d",
        TOK.encode("hello"),
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=("zz",)),
    )
    pieces, ids, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            pieces.append(out.outputs[0].new_text)
            ids += out.outputs[0].new_token_ids
            final = out
    assert "".join(pieces) == final.outputs[0].text
    assert ids == final.outputs[0].token_ids


def test_n_with_seed_is_reproducible_and_shares_the_prompt(model):
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7)
    a = run(make_engine(model), {"a": ("shared prompt text", params)})["a"]
    b = run(
        make_engine(model),
        {"pad": ("other", SamplingParams(max_tokens=3)), "b": ("shared prompt text", params)},
    )["b"]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert [o.index for o in a.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # n samples differ
    c = run(
        make_engine(model),
        {"c": ("shared prompt text", SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=8))},
    )["c"]
    assert [o.token_ids for o in c.outputs] != [o.token_ids for o in a.outputs]


def test_logprobs_are_the_models_raw_distribution(model):
    engine = make_engine(model)
    out = run(
        engine,
        {
            "l": (
                "logits",
                SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2),
            )
        },
    )["l"]
    lps = out.outputs[0].logprobs
    assert len(lps) == 4
    for lp, token in zip(lps, out.outputs[0].token_ids):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy picks the top token
        assert [p for _, p in lp.top] == sorted([p for _, p in lp.top], reverse=True)
    prompt_lps = out.prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(out.prompt_token_ids)
    # the prompt logprobs equal the training forward's log_softmax
    import jax.numpy as jnp

    logits = np.asarray(model(jnp.asarray([out.prompt_token_ids])))[0]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    for i, lp in enumerate(prompt_lps[1:], start=1):
        assert lp.logprob == pytest.approx(logp[i - 1, out.prompt_token_ids[i]], abs=1e-4)


def test_prompt_logprobs_survive_preemption_mid_prompt(model):
    """Long prompts in chunks on too few pages, so that the scheduler preempts and
    recomputes: prompt logprobs still have one entry per token, equal to the training
    forward's."""
    import jax.numpy as jnp

    engine = make_engine(model, num_pages=13, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=1)
    prompts = {"a": "a" * 50 + "first prompt", "b": "b" * 50 + "second prompt", "c": "c" * 40}
    done = run(engine, {rid: (text, params) for rid, text in prompts.items()})
    assert engine.scheduler.num_preemptions > 0
    for out in done.values():
        ids = out.prompt_token_ids
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        logits = np.asarray(model(jnp.asarray([ids])))[0]
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        got = [lp.logprob for lp in out.prompt_logprobs[1:]]
        np.testing.assert_allclose(got, logp[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)


def test_abort_returns_pages(model):
    engine = make_engine(model)
    engine.add_request("x", TOK.encode("abort me"), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    engine.abort("x")
    engine.abort("never-existed")
    assert engine.blocks.num_used_blocks == 0 and not engine.has_unfinished()


def test_bad_requests_are_refused_and_nothing_is_lost(model):
    engine = make_engine(model, max_waiting=2)
    engine.add_request("ok", TOK.encode("fine"), SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", TOK.encode("dup"), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.add_request("v", [1, 999], SamplingParams())
    with pytest.raises(ValueError, match="maximum context length is 128"):
        engine.add_request("long", [1] * 120, SamplingParams(max_tokens=16))
    engine.add_request("ok2", TOK.encode("fine"), SamplingParams(max_tokens=3))
    with pytest.raises(QueueFullError):
        engine.add_request("full", TOK.encode("x"), SamplingParams())
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["ok", "ok2"]


def test_a_group_whose_first_token_stops_keeps_all_members(model):
    """n > 1 where every member stops at its first token: the parent finishes in the same
    step its group forks from it, and each member still gets its own completion."""
    engine = make_engine(model, num_pages=32)
    every_token = tuple(range(CFG.vocab_size))
    params = SamplingParams(n=4, max_tokens=5, temperature=1.0, seed=3, stop_token_ids=every_token)
    done = run(engine, {"g": ("1+2=", params)})
    outputs = done["g"].outputs
    assert [o.index for o in outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 1 and o.finish_reason == "stop" for o in outputs)
    assert engine.blocks.num_free_blocks == 32
