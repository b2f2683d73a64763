"""What RL needs from the engine: new weights served by reference (no copy, no recompile,
stale prefix KV dropped) and logprobs of the temperature-scaled policy ("scaled" mode)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.configs import model_config_from_gin
from tandem.model import Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampler import SamplingBatch, sample
from tandem.serve.sampling_params import SamplingParams

CFG = model_config_from_gin("models/tiny.gin")
TOK = byte_tokenizer()
ENGINE = EngineConfig(page_size=8, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=64)
PROMPTS = ["a prompt long enough to fill several pages of KV", "short"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def run(engine, prompts, params):
    ids = [f"r{engine.stats()['num_param_updates']}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, TOK.encode(prompt), params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[rid] for rid in ids]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_update_params_serves_the_new_weights_by_reference():
    old, new = Transformer(CFG, rngs=nnx.Rngs(0)), Transformer(CFG, rngs=nnx.Rngs(1))
    engine = Engine(old, TOK, ENGINE)
    before = run(engine, PROMPTS, GREEDY)
    again = run(engine, PROMPTS, GREEDY)
    assert again[0].num_cached_tokens == 40  # 48 tokens: 5 full pages (the last is recomputed)
    compiles = engine.stats()["num_compiles"]

    new_params = nnx.state(new, nnx.Param)
    engine.update_params(new_params)
    after = run(engine, PROMPTS, GREEDY)
    expected = run(Engine(new, TOK, ENGINE), PROMPTS, GREEDY)

    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].token_ids for o in after] != [o.outputs[0].token_ids for o in before]
    assert after[0].num_cached_tokens == 0  # the old weights' prefix KV was dropped
    assert engine.stats()["num_compiles"] == compiles
    assert engine.stats()["num_param_updates"] == 1
    served, given = jax.tree.leaves(engine.params), jax.tree.leaves(new_params)
    assert len(served) == len(given) and all(a is b for a, b in zip(served, given))


def test_update_params_refuses_mismatches_and_a_busy_engine():
    engine = Engine(Transformer(CFG, rngs=nnx.Rngs(0)), TOK, ENGINE)
    params = nnx.state(Transformer(CFG, rngs=nnx.Rngs(2)), nnx.Param)

    def replace(fn, where):
        return jax.tree_util.tree_map_with_path(
            lambda p, x: fn(x) if where in jax.tree_util.keystr(p) else x, params
        )

    with pytest.raises(ValueError, match=r"\['lm_head'\].* is float32\[64, 383\]"):
        engine.update_params(replace(lambda x: x[:, :-1], "lm_head"))
    with pytest.raises(ValueError, match=r"\['embed'\].* is bfloat16\[384, 64\].* float32"):
        engine.update_params(replace(lambda x: x.astype(jnp.bfloat16), "embed"))
    one_layer = dataclasses.replace(CFG, num_layers=1)
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\].* is missing"):
        engine.update_params(nnx.state(Transformer(one_layer, rngs=nnx.Rngs(0)), nnx.Param))

    engine.add_request("busy", TOK.encode("hi"), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="unfinished"):
        engine.update_params(params)
    engine.abort("busy")
    engine.update_params(params)
    assert jax.tree.leaves(engine.params)[0] is jax.tree.leaves(params)[0]


def test_logprobs_mode_is_validated():
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        SamplingParams(logprobs_mode="processed")
    assert SamplingParams(temperature=0.7, logprobs_mode="scaled").logprob_temperature == 0.7
    assert SamplingParams(temperature=0.0, logprobs_mode="scaled").logprob_temperature == 1.0
    assert SamplingParams(temperature=0.7).logprob_temperature == 1.0


def test_sampler_mixes_raw_and_scaled_rows_without_recompiling():
    vocab, temp = 32, 0.7
    logits = np.random.RandomState(0).randn(8, vocab).astype(np.float32) * 3
    modes = ["raw", "scaled"] * 4
    params = [
        SamplingParams(temperature=temp, seed=i, logprobs=3, logprobs_mode=m, top_k=5, min_p=0.1)
        for i, m in enumerate(modes)
    ]
    params[7] = SamplingParams(temperature=0.0, logprobs=3, logprobs_mode="scaled")

    def build(ps):
        return SamplingBatch.build(ps, [[]] * 8, [[]] * 8, vocab_size=vocab, pad_to=8)

    all_raw = [SamplingParams(temperature=temp, seed=i, logprobs=3, top_k=5) for i in range(8)]
    sample(logits, build(all_raw), jax.random.key(0))
    compiles = sample._cache_size()
    out = jax.tree.map(np.asarray, sample(logits, build(params), jax.random.key(0)))
    assert sample._cache_size() == compiles

    # Full-vocabulary log_softmax, untouched by top_k / min_p: scaled rows at T, others raw.
    temps = np.array([temp if m == "scaled" else 1.0 for m in modes[:7]] + [1.0])
    expected = log_softmax(logits / temps[:, None])
    chosen = expected[np.arange(8), out.tokens]
    np.testing.assert_allclose(out.logprobs, chosen, atol=1e-5)
    top = out.top_logprobs[:, :3]  # K = MAX_LOGPROBS columns; the engine reports `logprobs`
    np.testing.assert_allclose(top, -np.sort(-expected, axis=-1)[:, :3], atol=1e-5)


def test_engine_scaled_logprobs_equal_the_training_forward():
    temp = 0.7
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    engine = Engine(model, TOK, ENGINE)
    common = dict(n=2, max_tokens=8, temperature=temp, seed=3, logprobs=0, prompt_logprobs=0)
    [scaled] = run(engine, PROMPTS[:1], SamplingParams(**common, logprobs_mode="scaled"))
    [raw] = run(engine, PROMPTS[:1], SamplingParams(**common))
    for out, t in ((scaled, temp), (raw, 1.0)):
        for completion in out.outputs:
            tokens = out.prompt_token_ids + completion.token_ids
            logits = np.asarray(model(jnp.asarray([tokens])))[0]  # [T, V]
            logp = log_softmax(logits / t)
            p = len(out.prompt_token_ids)
            # logits at position i predict token i + 1
            want = logp[np.arange(p - 1, len(tokens) - 1), completion.token_ids]
            got = [lp.logprob for lp in completion.logprobs]
            np.testing.assert_allclose(got, want, atol=1e-5)
            want_prompt = logp[np.arange(p - 1), out.prompt_token_ids[1:]]
            got_prompt = [lp.logprob for lp in out.prompt_logprobs[1:]]
            np.testing.assert_allclose(got_prompt, want_prompt, atol=1e-5)
    # Same seed and temperature: the mode changes what is reported, never what is sampled.
    assert [c.token_ids for c in scaled.outputs] == [c.token_ids for c in raw.outputs]
