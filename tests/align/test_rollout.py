"""Rollouts through the serving engine on the tiny model: groups in order, prompt pages
shared by the group, engine logprobs equal to the trainer's recomputation, training rows,
and DAPO dynamic sampling."""

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tandem.align.rl.rollout import (
    PromptBatch,
    Rollouts,
    dynamic_sample,
    generate,
    to_batch,
)
from tandem.configs import model_config_from_gin
from tandem.model import Transformer
from tandem.model.tokenizer import byte_tokenizer
from tandem.serve.engine import Engine, EngineConfig
from tandem.serve.sampling_params import SamplingParams

TOK = byte_tokenizer()
PAGE = 8
PROMPTS = [TOK.encode(t) for t in ["What is two plus two?", "Name a colour, please!", "Hi there"]]
TEMP = 0.7


@pytest.fixture(scope="module")
def model():
    return Transformer(model_config_from_gin("models/tiny.gin"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
    cfg = EngineConfig(page_size=PAGE, max_num_batched_tokens=16, max_num_seqs=16, max_model_len=64)
    return Engine(model, TOK, cfg)


def trainer_logps(model, tokens, temperature):
    """What the trainer recomputes: log_softmax(model(tokens) / T), the logprob of token t
    placed at t (predicted by the logits at t - 1); [N, T]."""
    logits = np.asarray(model(jnp.asarray(tokens)), np.float64) / temperature  # [N, T, V]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    out = np.zeros(tokens.shape)
    out[:, 1:] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    return out


def test_groups_in_prompt_order_share_prompt_pages_and_match_the_trainer(model, engine):
    tables = []  # per step: {seq_id: block table} of the running sequences
    step = engine.step

    def recording_step():
        out = step()
        tables.append(
            {s.seq_id: engine.blocks.block_table(s.seq_id) for s in engine.scheduler.running}
        )
        return out

    engine.step = recording_step
    try:
        r = generate(engine, PROMPTS, group_size=4, max_tokens=10, temperature=TEMP, seed=1)
    finally:
        del engine.step

    assert len(r) == 12 and r.num_groups == 3
    np.testing.assert_array_equal(r.group, np.repeat([0, 1, 2], 4))
    assert r.prompt_ids == [p for p in PROMPTS for _ in range(4)]
    assert len({tuple(c) for c in r.completion_ids[:4]}) > 1  # the group's samples differ
    for c, lp, f in zip(r.completion_ids, r.engine_logps, r.finish_reasons):
        assert lp.shape == (len(c),) and lp.dtype == np.float32 and np.all(lp <= 0)
        assert f == "stop" or (f == "length" and len(c) == 10)
    assert r.seconds > 0

    # The group's members hold the very same physical pages for the prompt's full pages.
    for g, prompt in enumerate(PROMPTS):
        members = [f"rollout-{_call_of(tables)}-{g}#{i}" for i in range(4)]
        full = len(prompt) // PAGE
        seen = [t for t in tables if all(m in t for m in members)]
        assert seen, "the group never ran together"
        for t in seen:
            assert len({tuple(t[m][:full]) for m in members}) == 1

    # |logp_engine - logp_trainer| on every completion token, f32.
    batch = to_batch(r, pad_id=TOK.pad_token_id)
    want = trainer_logps(model, batch["tokens"], TEMP)
    mask = batch["completion_mask"] > 0
    diff = np.abs(batch["engine_logps"] - want)[mask]
    assert mask.sum() == sum(len(c) for c in r.completion_ids)
    assert diff.max() < 1e-4, diff.max()


def _call_of(tables):
    """The generate call number in the recorded request ids ('rollout-<call>-<prompt>#<i>')."""
    return next(iter(tables[0])).split("-")[1]


def test_seeded_rollouts_repeat_and_reuse_cached_prompt_pages(engine):
    kw = dict(group_size=2, max_tokens=4, temperature=1.0, seed=5)
    prompts = [TOK.encode("a prompt of more than two pages!")]  # 32 tokens
    first = generate(engine, prompts, **kw)
    second = generate(engine, prompts, **kw)
    assert second.completion_ids == first.completion_ids
    assert second.num_cached_tokens == 24  # 3 full pages; the last token is recomputed
    other = generate(engine, prompts, **{**kw, "seed": 6})
    assert other.completion_ids != first.completion_ids


def test_stop_tokens_end_completions_and_stay_in_them(engine):
    stops = tuple(range(0, 384, 2))  # every even token id: most completions stop early
    r = generate(engine, PROMPTS[:1], group_size=4, max_tokens=8, seed=0, stop_token_ids=stops)
    batch = to_batch(r, pad_id=0)
    for c, f, has_eos in zip(r.completion_ids, r.finish_reasons, batch["has_eos"]):
        assert has_eos == (f == "stop")
        if f == "stop":  # the stop token is the last completion token (TRL keeps EOS)
            assert c[-1] % 2 == 0 and all(t % 2 for t in c[:-1])
    assert "stop" in r.finish_reasons


def test_to_batch_rows_on_a_hand_made_rollout():
    r = Rollouts(
        prompt_ids=[[1, 2, 3], [4]],
        completion_ids=[[5, 6], [7, 8, 9, 10, 11]],
        engine_logps=[
            np.array([-0.5, -1.5], np.float32),
            np.array([-1, -2, -3, -4, -5], np.float32),
        ],
        finish_reasons=["stop", "length"],
        group=np.array([0, 0], np.int32),
    )
    b = to_batch(r, pad_id=99)
    assert b["tokens"].shape == (2, 16)  # longest row 6 -> the smallest bucket, 16
    np.testing.assert_array_equal(b["tokens"][0, :6], [1, 2, 3, 5, 6, 99])
    np.testing.assert_array_equal(b["tokens"][1, :7], [4, 7, 8, 9, 10, 11, 99])
    np.testing.assert_array_equal(b["completion_mask"][0, :6], [0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(b["engine_logps"][1, :7], [0, -1, -2, -3, -4, -5, 0])
    np.testing.assert_array_equal(b["prompt_lengths"], [3, 1])
    np.testing.assert_array_equal(b["completion_lengths"], [2, 5])
    np.testing.assert_array_equal(b["has_eos"], [True, False])
    assert b["tokens"].dtype == np.int32 and b["completion_mask"].dtype == np.float32
    assert to_batch(r, pad_id=0, max_length=6)["tokens"].shape == (2, 6)
    long = Rollouts([[1] * 20], [[2] * 3], [np.zeros(3, np.float32)], ["length"], np.zeros(1))
    assert to_batch(long, pad_id=0)["tokens"].shape == (1, 32)
    with pytest.raises(
        ValueError, match=r"row 1 has 6 tokens \(1 prompt \+ 5 completion\), more than max_length=5"
    ):
        to_batch(r, pad_id=0, max_length=5)


def test_generate_rejects_bad_requests_and_leaves_the_engine_idle(engine):
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(engine, [], group_size=2, max_tokens=4)
    with pytest.raises(ValueError, match="prompt 1: .*maximum context length is 64"):
        generate(engine, [[1, 2], [1] * 60], group_size=2, max_tokens=8)
    assert not engine.has_unfinished() and not engine.requests
    engine.add_request("someone-else", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="unfinished requests"):
        generate(engine, [[1]], group_size=2, max_tokens=4)
    engine.abort("someone-else")


def fake_reward(rollouts, columns):
    """Per completion: 'const' groups all score 0; 'vary' groups score 0, 1, 0, 1...;
    'nan' groups score NaN for their first completion and 1 for the rest."""
    out, seen = [], {}
    for kind, g in zip(columns["kind"], rollouts.group):
        i = seen[g] = seen.get(g, -1) + 1
        out.append({"const": 0.0, "vary": float(i % 2), "nan": np.nan if i == 0 else 1.0}[kind])
    return out


def batches(kinds_per_batch):
    for kinds in kinds_per_batch:
        yield PromptBatch([PROMPTS[2]] * len(kinds), {"kind": kinds, "id": list(range(len(kinds)))})


def test_dynamic_sampling_keeps_informative_groups(engine):
    kw = dict(group_size=2, max_tokens=2, seed=0)
    s = dynamic_sample(
        engine,
        batches([["const", "vary"], ["nan", "vary"], ["vary", "vary", "const"]]),
        fake_reward,
        num_groups=3,
        max_tries=5,
        **kw,
    )
    # try 1 keeps 1 (drops const), try 2 keeps 1 (drops nan: one finite reward), try 3 drops
    # const and keeps the first vary of two (the second is past num_groups): 3 dropped.
    assert (s.num_tries, s.num_dropped_groups) == (3, 3)
    np.testing.assert_array_equal(s.rollouts.group, np.repeat([0, 1, 2], 2))
    assert s.columns["kind"] == ["vary"] * 6 and s.columns["id"] == [1, 1, 1, 1, 0, 0]
    np.testing.assert_array_equal(s.rewards, [0, 1] * 3)
    assert len(s.rollouts.completion_ids) == 6


def test_dynamic_sampling_keeps_what_it_has_when_tries_run_out(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="tandem.align.rl.rollout"):
        s = dynamic_sample(
            engine,
            batches([["const"], ["vary", "const"], ["vary"]]),
            fake_reward,
            num_groups=4,
            max_tries=2,
            group_size=2,
            max_tokens=2,
        )
    assert (s.num_tries, s.num_dropped_groups, len(s.rollouts)) == (2, 2, 2)
    assert "kept 1 of 4 groups after 2 tries (2 dropped" in caplog.text
    with pytest.raises(ValueError, match="num_groups and max_tries"):
        dynamic_sample(engine, batches([]), fake_reward, num_groups=0, max_tries=1)
