"""Group advantages (TRL, with Tunix/OpenRLHF epsilons), Dr.GRPO, RLOO, PPO token rewards and
GAE against TRL's PPO code, and DAPO's soft overlong punishment."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from trl_reference import (
    grpo_advantages,
    masked_whiten,
    ppo_gae,
    ppo_rewards,
    soft_overlong_punishment,
)

from tandem.align import registry
from tandem.align.logprobs import masked_whiten as our_whiten
from tandem.align.rl.advantages import (
    dr_grpo_advantages,
    gae,
    get_advantage,
    group_advantages,
    ppo_token_rewards,
    rloo_advantages,
    soft_overlong_penalty,
)


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def rewards_with_a_flat_group(seed, num_prompts=3, group_size=4):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=num_prompts * group_size).astype(np.float32)
    rewards[:group_size] = 1.0  # every completion right: std 0, advantage 0
    return rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("epsilon", [1e-4, 1e-6, 1e-9], ids=["trl", "tunix-verl", "openrlhf"])
def test_group_advantages_match_trl(scale, epsilon):
    rewards = rewards_with_a_flat_group(seed=1)
    got = group_advantages(jnp.asarray(rewards), 4, scale=scale, epsilon=epsilon)
    close(got, grpo_advantages(rewards, 4, scale, eps=epsilon), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[:4], 0.0)


def test_group_advantages_binary_rewards_g2():
    # G=2 with one right and one wrong answer: std = sqrt(0.5) (Bessel), A = +-0.5/0.7071.
    got = group_advantages(jnp.array([1.0, 0.0]), 2, epsilon=0.0)
    close(got, [np.sqrt(0.5), -np.sqrt(0.5)])


def test_singleton_groups_and_ddof():
    rewards = jnp.array([0.3, -1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(group_advantages(rewards, 1)), 0.0)
    np.testing.assert_array_equal(np.asarray(group_advantages(rewards[:1], 1, scale="batch")), 0.0)
    r = rewards_with_a_flat_group(seed=2)
    grouped = r.reshape(-1, 4).astype(np.float64)
    want = (grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-4)
    close(group_advantages(jnp.asarray(r), 4, ddof=0), want.reshape(-1), rtol=1e-5)


def test_dr_grpo_and_rloo():
    rewards = rewards_with_a_flat_group(seed=3)
    close(dr_grpo_advantages(jnp.asarray(rewards), 4), grpo_advantages(rewards, 4, "none"))
    grouped = rewards.reshape(-1, 4).astype(np.float64)
    want = np.array(
        [[r[i] - (r.sum() - r[i]) / (len(r) - 1) for i in range(len(r))] for r in grouped]
    )
    close(rloo_advantages(jnp.asarray(rewards), 4), want.reshape(-1))


def test_advantage_registry():
    assert set(registry.names("advantage")) == {"grpo", "dr_grpo", "rloo"}
    assert get_advantage("rloo") is rloo_advantages
    with pytest.raises(ValueError, match="known advantages: .*'grpo'"):
        get_advantage("ppo")


def test_bad_advantage_inputs_raise():
    rewards = jnp.zeros(6)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 3, scale="prompt")
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        dr_grpo_advantages(jnp.zeros((2, 3)), 3)


# ------------------------------------------------------------------------------ PPO

B, T = 8, 12
# Completion lengths including the EOS; the full-length row without EOS was truncated.
LENGTHS = np.array([12, 5, 1, 12, 3, 6, 9, 2])
HAS_EOS = np.array([False, True, True, True, True, True, True, True])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)


def ppo_batch(seed):
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    return {
        "scores": rng.normal(size=B).astype(np.float32),
        "logps": logps,
        "ref_logps": (logps + rng.normal(0, 0.4, (B, T))).astype(np.float32),
        "values": rng.normal(size=(B, T)).astype(np.float32),  # garbage past the EOS too
    }


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("penalty", [None, 1.0])
def test_ppo_token_rewards_match_trl(kl_estimator, penalty):
    batch = ppo_batch(seed=4)
    ours = ppo_token_rewards(
        jnp.asarray(batch["scores"]),
        jnp.asarray(batch["logps"]),
        jnp.asarray(batch["ref_logps"]),
        jnp.asarray(MASK),
        kl_coef=0.05,
        kl_estimator=kl_estimator,
        missing_eos_penalty=penalty,
        has_eos=jnp.asarray(HAS_EOS),
    )
    # TRL with pad == EOS: seq_len is the last token before the EOS (or the last token of a
    # truncated row); the score lands on seq_len + 1, the EOS.
    sequence_lengths = np.where(HAS_EOS, LENGTHS - 2, LENGTHS - 1)
    want, _, _ = ppo_rewards(
        batch["scores"],
        batch["logps"],
        batch["ref_logps"],
        sequence_lengths,
        HAS_EOS,
        kl_coef=0.05,
        kl_estimator=kl_estimator,
        missing_eos_penalty=penalty,
    )
    # The one documented difference: TRL's EOS is its pad, so the EOS token gets no KL
    # penalty there; here the EOS is a sampled, masked token and keeps its -kl_coef * KL.
    rows = np.flatnonzero(HAS_EOS)
    eos = LENGTHS[rows] - 1
    delta = batch["logps"][rows, eos].astype(np.float64) - batch["ref_logps"][rows, eos]
    kl = delta if kl_estimator == "k1" else np.exp(-delta) + delta - 1
    want[rows, eos] -= 0.05 * kl
    close(ours, want)
    np.testing.assert_array_equal(np.asarray(ours)[MASK == 0], 0.0)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_trl_loop(gamma, lam):
    batch = ppo_batch(seed=5)
    rewards = np.asarray(
        ppo_token_rewards(
            jnp.asarray(batch["scores"]),
            jnp.asarray(batch["logps"]),
            jnp.asarray(batch["ref_logps"]),
            jnp.asarray(MASK),
        )
    )
    advantages, returns = gae(
        jnp.asarray(rewards), jnp.asarray(batch["values"]), jnp.asarray(MASK), gamma, lam
    )
    # TRL zeroes values past seq_len + 1, i.e. past this mask's last token.
    padding_mask_p1 = MASK == 0
    want_adv, want_ret = ppo_gae(rewards, batch["values"], padding_mask_p1, gamma, lam)
    close(advantages, want_adv, rtol=1e-5)
    close(returns, want_ret, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(advantages)[MASK == 0], 0.0)
    # TRL then whitens the advantages over the mask (Bessel variance, rsqrt(var + 1e-8)).
    close(our_whiten(advantages, MASK), masked_whiten(want_adv, MASK), rtol=1e-5)


def test_gae_hand_case():
    # gamma = lam = 1, T = 3, r = (1, 0, 3), V = (0, 2, 0):
    # delta_0 = r_0 + V_1 - V_0 = 3, delta_1 = r_1 + V_2 - V_1 = -2, delta_2 = r_2 - V_2 = 3
    # A = (3 - 2 + 3, -2 + 3, 3) = (4, 1, 3);  R = A + V = (4, 3, 3)
    adv, ret = gae(
        jnp.array([[1.0, 0.0, 3.0]]), jnp.array([[0.0, 2.0, 0.0]]), jnp.ones((1, 3)), 1.0, 1.0
    )
    close(adv, [[4.0, 1.0, 3.0]])
    close(ret, [[4.0, 3.0, 3.0]])


def test_gae_keeps_values_inside_mask_holes():
    batch = ppo_batch(seed=6)
    holed = MASK.copy()
    holed[0, 2:4] = 0.0  # tool-result tokens inside the completion
    args = (jnp.asarray(batch["values"]) * 0 + 0.5, jnp.asarray(batch["values"]))
    full = gae(*args, jnp.asarray(MASK))
    with_hole = gae(*args, jnp.asarray(holed))
    close(with_hole[0], np.asarray(full[0]))


def test_soft_overlong_penalty_matches_trl():
    lengths = np.array([0, 10, 16, 17, 18, 19, 20, 21, 40])
    got = soft_overlong_penalty(jnp.asarray(lengths), max_len=20, cache_len=4)
    close(got, soft_overlong_punishment(lengths, 20, 4))
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_penalty(jnp.asarray(lengths), max_len=20, cache_len=0)


def test_bad_ppo_inputs_raise():
    batch = ppo_batch(seed=7)
    args = (jnp.asarray(batch["scores"]), jnp.asarray(batch["logps"]))
    with pytest.raises(ValueError, match="has_eos"):
        ppo_token_rewards(
            *args, jnp.asarray(batch["ref_logps"]), jnp.asarray(MASK), missing_eos_penalty=1.0
        )
    with pytest.raises(ValueError, match="ref_logps"):
        ppo_token_rewards(*args, jnp.asarray(batch["ref_logps"][:, :3]), jnp.asarray(MASK))
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo_token_rewards(
            *args, jnp.asarray(batch["ref_logps"]), jnp.asarray(MASK), kl_estimator="kl"
        )
    with pytest.raises(ValueError, match="values"):
        gae(jnp.zeros((B, T)), jnp.zeros((B, T + 1)), jnp.asarray(MASK))
