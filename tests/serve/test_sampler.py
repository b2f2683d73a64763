"""The sampler on an 8-token vocabulary whose distributions are computable by hand.

Shapes are kept to a few (B in {4, 8, 1024}) so the jitted sampler compiles few times.
"""

import jax
import numpy as np
import pytest

from tandem.serve.sampler import SamplingBatch, apply_penalties, sample, token_logprobs
from tandem.serve.sampling_params import SamplingParams as SP

V = 8
MANY = 1024  # draws per call: one row per draw, each with its own seed
# Probabilities by rank, distinct so no truncation boundary is a tie.
# mass before each rank: 0, .33, .58, .75, .86, .93, .97, .99
PROBS = np.array([0.33, 0.25, 0.17, 0.11, 0.07, 0.04, 0.02, 0.01])
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # the token holding rank r is PERM[r]
LOGITS = np.empty(V, np.float32)
LOGITS[PERM] = np.log(PROBS)
NEAR_UNIFORM = np.linspace(0.0, 0.7, V)


def run(params, logits, prompts=None, outputs=None, pad_to=None, key=0, **kw):
    n = len(params)
    batch = SamplingBatch.build(
        params,
        prompts or [[]] * n,
        outputs or [[]] * n,
        vocab_size=V,
        pad_to=pad_to or n,
        **kw,
    )
    logits = np.asarray(logits, np.float32)
    if logits.ndim == 1:
        logits = np.broadcast_to(logits, (batch.batch_size, V))
    out = sample(logits, batch, jax.random.key(key))
    return jax.tree.map(np.asarray, out)


def draws(logits=LOGITS, seed0=0, **params):
    """MANY tokens from one distribution: rows differ only in their seed."""
    return run([SP(seed=seed0 + i, **params) for i in range(MANY)], logits).tokens


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_greedy_rows_take_the_argmax_among_sampled_rows():
    logits = np.random.RandomState(0).randn(8, V)
    params = [SP(temperature=0), SP(temperature=1.0, seed=1)] * 4
    tokens = run(params, logits).tokens
    np.testing.assert_array_equal(tokens[::2], logits[::2].argmax(-1))


def test_temperature_to_zero_approaches_argmax():
    # Gaps between the top two logits are >= 0.05; at T=1e-3 the runner-up has relative
    # weight <= exp(-50). Below GREEDY_EPS (1e-5) rows are greedy outright.
    rs = np.random.RandomState(1)
    logits = rs.randn(MANY, V) * 3
    top2 = np.sort(logits, -1)[:, -2:]
    logits = logits[top2[:, 1] - top2[:, 0] > 0.05][:MANY]
    logits = np.concatenate([logits, logits])[:MANY]
    for t in (1e-3, 1e-6):
        tokens = run([SP(temperature=t, seed=i) for i in range(MANY)], logits).tokens
        np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_top_k_one_is_greedy():
    logits = np.random.RandomState(2).randn(MANY, V)
    params = [SP(temperature=1.5, top_k=1, seed=i) for i in range(MANY)]
    np.testing.assert_array_equal(run(params, logits).tokens, logits.argmax(-1))


@pytest.mark.parametrize(
    "params, ranks",
    [
        (dict(top_k=3), [0, 1, 2]),
        (dict(top_k=100), list(range(V))),  # k > V: off
        (dict(top_p=0.5), [0, 1]),  # mass before rank 2 is .58 >= .5
        (dict(top_p=0.6), [0, 1, 2]),  # .58 < .6 <= .75
        (dict(top_p=0.3), [0]),  # the top token is always kept
        (dict(min_p=0.3), [0, 1, 2, 3]),  # prob >= .3 * .33 = .099
        (dict(min_p=0.5), [0, 1, 2]),  # prob >= .165
        # top-p after top-k's renormalisation: the top 5 hold .93, so the mass before
        # rank 3 is .75 / .93 = .806 >= .8 (without renormalising, .75 would keep it)
        (dict(top_k=5, top_p=0.8), [0, 1, 2]),
        (dict(top_p=0.9, min_p=0.4), [0, 1, 2]),  # top-p keeps 5, min-p >= .132 keeps 3
        # temperature first: T=.5 squares the probabilities, .1089/.2194 = .496 of the
        # mass, then .781 before rank 2, so top_p=.7 keeps two (at T=1 it keeps three)
        (dict(temperature=0.5, top_p=0.7), [0, 1]),
    ],
)
def test_truncation_never_emits_a_token_outside_the_allowed_set(params, ranks):
    tokens = draws(**params)
    assert set(tokens.tolist()) == set(PERM[ranks].tolist())


@pytest.mark.parametrize(
    "params, expected_by_rank",
    [
        # T=2 takes the square root of the probabilities, then top-3 renormalises
        (dict(temperature=2.0, top_k=3), np.sqrt(PROBS[:3]) / np.sqrt(PROBS[:3]).sum()),
        # top_p=.9 keeps ranks 0..4, holding .93
        (dict(top_p=0.9), PROBS[:5] / PROBS[:5].sum()),
    ],
)
def test_empirical_frequencies_match_the_renormalised_distribution(params, expected_by_rank):
    tokens = np.concatenate([draws(seed0=MANY * j, **params) for j in range(4)])
    observed = np.bincount(tokens, minlength=V)[PERM[: len(expected_by_rank)]]
    assert observed.sum() == len(tokens)
    expected = expected_by_rank * len(tokens)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    # df <= 4: P(chi2 > 25) < 1e-4; the seeds are fixed, so this is deterministic anyway
    assert chi2 < 25, (observed, expected)


def generate(row_params, position, neighbours, pad_to, num_steps=6):
    """The row's tokens over num_steps decode steps, fed back as its output history."""
    out = []
    for _ in range(num_steps):
        params = list(neighbours)
        params.insert(position, row_params)
        outputs = [[1, 2]] * len(params)
        outputs[position] = list(out)
        tokens = run(params, NEAR_UNIFORM, outputs=outputs, pad_to=pad_to, key=len(out)).tokens
        out.append(int(tokens[position]))
    return out


def test_a_seed_gives_the_same_tokens_at_any_position_with_any_neighbours():
    row = SP(seed=1234, top_k=6)
    alone = generate(row, 0, [], pad_to=4)
    crowded = generate(
        row,
        5,
        [SP(temperature=0), SP(seed=7), SP(), SP(repetition_penalty=1.3), SP(logprobs=3)],
        pad_to=8,
    )
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_and_sample_indices_give_different_tokens():
    seqs = [tuple(generate(SP(seed=s), 0, [], pad_to=4, num_steps=10)) for s in range(6)]
    assert len(set(seqs)) == 6
    second = generate(SP(seed=0), 0, [], pad_to=4, num_steps=10)
    # the request's second completion (n=2): same seed, another stream
    batch_rows = [SP(seed=0), SP(seed=0), SP(seed=0)]
    tokens = [
        run(batch_rows, NEAR_UNIFORM, outputs=[[9] * t] * 3, sample_indices=[0, 0, 1]).tokens
        for t in range(10)
    ]
    tokens = np.stack(tokens)  # [steps, 3]
    assert tokens[:, 0].tolist() == second
    np.testing.assert_array_equal(tokens[:, 0], tokens[:, 1])
    assert (tokens[:, 0] != tokens[:, 2]).any()


def test_unseeded_rows_follow_the_engine_key():
    params = [SP() for _ in range(MANY)]
    a, b, c = (run(params, LOGITS, key=k).tokens for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5  # independent draws agree with prob sum(p^2) ~ .21
    assert len(set(a.tolist())) > 1  # rows within a step differ


def penalty_case():
    logits = np.array(
        [
            [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 0.9, -0.5],
            [0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 1.0, 0.0],
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
        ],
        np.float32,
    )
    params = [
        SP(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SP(temperature=0, presence_penalty=1.0),
        SP(temperature=0),  # no penalties, in a batch that has them
    ]
    prompts = [[0, 1, 0], [5], [3, 4]]
    outputs = [[3, 3, 4], [6], [3, 3]]
    expected = logits.copy()
    # row 0: repetition over prompt and output tokens {0, 1, 3, 4}, then
    # frequency * count + presence over the output tokens {3: 2, 4: 1}
    expected[0, 0] = 2.0 / 2  # positive logits are divided
    expected[0, 1] = -1.0 * 2  # negative logits are multiplied
    expected[0, 3] = 3.0 / 2 - 0.5 * 2 - 0.25  # = 0.25
    expected[0, 4] = -2.0 * 2 - 0.5 * 1 - 0.25  # = -4.75
    # row 1: presence over the output only; prompt token 5 keeps its logit
    expected[1, 6] = 1.0 - 1.0
    return params, logits, prompts, outputs, expected


def test_penalties_change_the_logits_as_the_formulas_say():
    params, logits, prompts, outputs, expected = penalty_case()
    batch = SamplingBatch.build(params, prompts, outputs, vocab_size=V, pad_to=4)
    got = apply_penalties(np.pad(logits, ((0, 1), (0, 0))), batch)
    np.testing.assert_array_equal(np.asarray(got)[:3], expected)


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    params, logits, prompts, outputs, expected = penalty_case()
    tokens = run(params, logits, prompts, outputs).tokens
    assert logits.argmax(-1).tolist() == [3, 5, 7]
    np.testing.assert_array_equal(tokens, expected.argmax(-1))  # [0, 5, 7]


def test_logprobs_are_the_raw_log_softmax_whatever_the_processing():
    rs = np.random.RandomState(3)
    logits = rs.randn(4, V) * 2
    params = [
        SP(logprobs=5, temperature=0.3, top_k=2, repetition_penalty=1.5, seed=0),
        SP(logprobs=0, temperature=0),
        SP(logprobs=20, top_p=0.5, frequency_penalty=1.0, seed=1),
        SP(),
    ]
    out = run(params, logits, prompts=[[0, 1]] * 4, outputs=[[2, 3]] * 4)
    raw = log_softmax(logits)
    np.testing.assert_allclose(out.logprobs, raw[np.arange(4), out.tokens], atol=1e-5)
    assert out.top_ids.shape == (4, V)  # K = min(MAX_LOGPROBS, V)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-raw, -1))
    np.testing.assert_allclose(out.top_logprobs, np.sort(raw, -1)[:, ::-1], atol=1e-5)


def test_no_alternatives_when_no_row_asks_for_them():
    out = run([SP(logprobs=0, seed=0), SP()], LOGITS, pad_to=4)
    assert out.top_ids.shape == (4, 0) and out.top_logprobs.shape == (4, 0)
    np.testing.assert_allclose(out.logprobs[0], log_softmax(LOGITS)[out.tokens[0]], atol=1e-6)


def test_prompt_token_logprobs():
    logits = np.random.RandomState(4).randn(5, V).astype(np.float32)
    ids = np.array([1, 0, 7, 7, 3], np.int32)
    chosen, top_ids, top_lp = token_logprobs(logits, ids, 2)
    raw = log_softmax(logits)
    np.testing.assert_allclose(chosen, raw[np.arange(5), ids], atol=1e-6)
    np.testing.assert_array_equal(top_ids, np.argsort(-raw, -1)[:, :2])
    np.testing.assert_allclose(top_lp, np.sort(raw, -1)[:, ::-1][:, :2], atol=1e-6)


def test_two_compiles_per_padded_batch_size_whatever_the_request_mix():
    # pad_to 11 and 13 are used by no other test, so each adds exactly its own compiles:
    # one for rows that need no sort or penalties, one (is_full) for those that do.
    mixes = [
        ([SP(temperature=0)], [[]]),
        ([SP(seed=3, top_k=2), SP(top_p=0.4)], [[1], [2, 3, 4]]),
        ([SP(min_p=0.2, temperature=0.7), SP(temperature=0), SP(seed=9)], [[], [5], [6, 6]]),
        ([SP(logprobs=0)], [[1] * 40]),
    ]
    before = sample._cache_size()
    for pad_to in (11, 13):
        for params, outputs in mixes:
            run(params, LOGITS, outputs=outputs, pad_to=pad_to, key=len(outputs))
    assert sample._cache_size() == before + 4
    # Penalties switch the dense penalty columns on (width V), whatever the histories'
    # lengths.
    for outputs in ([[1]], [[1, 2, 3]], [list(range(V)) * 3]):
        run([SP(repetition_penalty=1.2)], LOGITS, outputs=outputs, pad_to=11)
    assert sample._cache_size() == before + 5


def test_build_pads_with_greedy_rows_and_checks_its_inputs():
    batch = SamplingBatch.build([SP(seed=2**40 + 5)], [[1]], [[2, 2]], vocab_size=V, pad_to=4)
    assert batch.batch_size == 4
    np.testing.assert_array_equal(batch.temperature, [1, 0, 0, 0])
    np.testing.assert_array_equal(batch.step, [2, 0, 0, 0])
    np.testing.assert_array_equal(batch.seed[0], [5, 2**8])
    assert batch.output_counts.shape == (4, 0)  # no penalties: the step is skipped
    with pytest.raises(ValueError, match="pad_to"):
        SamplingBatch.build([SP()] * 3, [[]] * 3, [[]] * 3, vocab_size=V, pad_to=2)
    with pytest.raises(ValueError, match="token ids"):
        SamplingBatch.build([SP(presence_penalty=1)], [[V]], [[]], vocab_size=V, pad_to=2)
