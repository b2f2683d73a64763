"""PPO policy and value losses against TRL's PPOTrainer minibatch loss, and their
accumulation contract (both divide by the whole batch's completion tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_reference import ppo_losses

from tandem.align.losses import get_loss, loss_denominator

B, T = 8, 12
LENGTHS = np.array([12, 6, 1, 8, 3, 12, 5, 9])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def make_batch(seed):
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    return {
        "logps": logps,
        "old_logps": (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32),
        "advantages": rng.normal(size=(B, T)).astype(np.float32),
        "values": values,
        "old_values": (values + rng.normal(0, 0.3, (B, T))).astype(np.float32),
        "returns": (values + rng.normal(0, 0.5, (B, T))).astype(np.float32),
        "mask": MASK,
    }


def policy(batch, clip=0.2, normalizer=None):
    keys = ("logps", "old_logps", "advantages", "mask")
    return get_loss("ppo_policy")(*(jnp.asarray(batch[k]) for k in keys), clip, normalizer)


def value(batch, clip=0.2, normalizer=None):
    keys = ("values", "old_values", "returns", "mask")
    return get_loss("ppo_value")(*(jnp.asarray(batch[k]) for k in keys), clip, normalizer)


@pytest.mark.parametrize("clip", [0.1, 0.2])
def test_matches_trl(clip):
    batch = make_batch(seed=1)
    pg, pg_metrics = policy(batch, clip)
    vf, vf_metrics = value(batch, clip)
    want_pg, want_vf, pg_clipfrac, vf_clipfrac = ppo_losses(
        batch["logps"],
        batch["old_logps"],
        batch["advantages"],
        batch["values"],
        batch["old_values"],
        batch["returns"],
        MASK,
        cliprange=clip,
        cliprange_value=clip,
    )
    close(pg, want_pg)
    close(vf, want_vf)
    close(pg_metrics["clip_fraction"], pg_clipfrac)
    close(vf_metrics["value_clip_fraction"], vf_clipfrac)
    assert 0 < float(pg_metrics["clip_fraction"]) < 1
    assert 0 < float(vf_metrics["value_clip_fraction"]) < 1


@pytest.mark.parametrize("split", [[1] * 8, [4, 4]], ids=["8x1", "2x4"])
def test_micro_batches_sum_to_full_batch(split):
    batch = make_batch(seed=2)
    tokens = loss_denominator(jnp.asarray(MASK), "token_mean")
    chunks = np.split(np.arange(B), np.cumsum(split)[:-1])

    def total_loss(lp, v, rows, normalizer):
        part = {k: x[rows] for k, x in batch.items()}
        pg, _ = policy({**part, "logps": lp}, normalizer=normalizer)
        vf, _ = value({**part, "values": v}, normalizer=normalizer)
        return pg + 0.1 * vf  # TRL's vf_coef

    grad_fn = jax.value_and_grad(total_loss, argnums=(0, 1))
    full, (g_lp, g_v) = grad_fn(batch["logps"], batch["values"], np.arange(B), None)
    total, lp_grads, v_grads = 0.0, [], []
    for rows in chunks:
        micro, (m_lp, m_v) = grad_fn(batch["logps"][rows], batch["values"][rows], rows, tokens)
        total += float(micro)
        lp_grads.append(np.asarray(m_lp))
        v_grads.append(np.asarray(m_v))
    close(total, float(full))
    close(np.concatenate(lp_grads), np.asarray(g_lp), atol=1e-7)
    close(np.concatenate(v_grads), np.asarray(g_v), atol=1e-7)


def test_bad_inputs_raise():
    batch = make_batch(seed=3)
    with pytest.raises(ValueError, match="clip"):
        policy(batch, clip=0.0)
    with pytest.raises(ValueError, match="advantages"):
        policy({**batch, "advantages": batch["advantages"][:, 0]})
    with pytest.raises(ValueError, match="returns"):
        value({**batch, "returns": batch["returns"][:4]})
