"""Per-token logprobs and entropies against a naive log_softmax, and the masked statistics
against TRL's utils (masked_mean, masked_var with Bessel, masked_whiten)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import trl_reference as trl

from tandem.align.logprobs import (
    average_logps,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    next_token_entropy,
    next_token_logprobs,
    sequence_logps,
)

B, T, V = 3, 6, 11


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def logits_and_tokens(seed):
    rng = np.random.default_rng(seed)
    logits = (3.0 * rng.normal(size=(B, T, V))).astype(np.float32)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    return logits, tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_next_token_logprobs_is_shifted_log_softmax(temperature):
    logits, tokens = logits_and_tokens(seed=1)
    got = np.asarray(next_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature))
    # TRL: logits[:, :-1] / T, selective_log_softmax against tokens[:, 1:]
    want = trl.selective_log_softmax(logits[:, :-1].astype(np.float64) / temperature, tokens[:, 1:])
    close(got[:, 1:], want, rtol=1e-5)
    np.testing.assert_array_equal(got[:, 0], 0.0)
    # The temperature really is applied: T = 0.7 differs from T = 1.
    if temperature != 1.0:
        untempered = np.asarray(next_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
        assert np.max(np.abs(untempered - got)) > 0.1


def test_next_token_logprobs_accepts_bf16():
    logits, tokens = logits_and_tokens(seed=2)
    got = next_token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens))
    assert got.dtype == jnp.float32
    want = trl.selective_log_softmax(
        np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64)[:, :-1], tokens[:, 1:]
    )
    close(np.asarray(got)[:, 1:], want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_next_token_entropy(temperature):
    logits, _ = logits_and_tokens(seed=3)
    got = np.asarray(next_token_entropy(jnp.asarray(logits), temperature))
    close(got[:, 1:], trl.entropy_from_logits(logits[:, :-1].astype(np.float64) / temperature))
    np.testing.assert_array_equal(got[:, 0], 0.0)
    assert np.all(got[:, 1:] <= np.log(V) + 1e-6)


def test_masked_statistics_match_trl():
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, (B, T)).astype(np.float32)
    mask = (rng.uniform(size=(B, T)) < 0.6).astype(np.float32)
    x_masked_garbage = np.where(mask > 0, x, np.nan).astype(np.float32)  # padding never leaks
    close(masked_mean(x_masked_garbage, mask), trl.masked_mean(x, mask))
    close(masked_mean(x, mask, axis=1), trl.masked_mean(x, mask, axis=1))
    close(masked_sum(x, mask > 0), (x * mask).sum())
    close(masked_var(x_masked_garbage, mask), trl.masked_var(x, mask), rtol=1e-5)
    close(masked_var(x, mask, unbiased=False), trl.masked_var(x, mask, unbiased=False), rtol=1e-5)
    for shift_mean in (True, False):
        close(masked_whiten(x, mask, shift_mean), trl.masked_whiten(x, mask, shift_mean), rtol=1e-5)
    whitened = np.asarray(masked_whiten(x, mask))
    close(trl.masked_mean(whitened, mask), 0.0, atol=1e-5)
    close(trl.masked_var(whitened, mask), 1.0, rtol=1e-5)


def test_all_masked_is_zero_not_nan():
    x = jnp.ones((2, 3))
    mask = jnp.zeros((2, 3))
    assert float(masked_mean(x, mask)) == 0.0
    assert float(masked_var(x, mask)) == 0.0
    np.testing.assert_array_equal(np.asarray(average_logps(x, mask)), 0.0)


def test_sequence_and_average_logps():
    lp = jnp.array([[-1.0, -2.0, -4.0], [-0.5, -0.5, -9.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], bool)
    close(sequence_logps(lp, mask), [-3.0, -0.5])
    close(average_logps(lp, mask), [-1.5, -0.5])


def test_bad_inputs_raise():
    logits, tokens = logits_and_tokens(seed=5)
    with pytest.raises(ValueError, match="tokens"):
        next_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens[:, :3]))
    with pytest.raises(ValueError, match="temperature"):
        next_token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 0.0)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        next_token_entropy(jnp.asarray(logits[0]))
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(jnp.ones((2, 3)), jnp.ones((2, 4)))
