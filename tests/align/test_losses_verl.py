"""The GRPO-family loss against veRL's compute_policy_loss_vanilla for the knobs TRL lacks:
dual-clip, k1/k2/k3 KL with veRL's clamps, the +-20 log-ratio clamp, seq-mean-token-sum and
rollout importance weights. The oracle below is a NumPy float64 transcription of
verl/trainer/ppo/core_algos.py (compute_policy_loss_vanilla, kl_penalty, agg_loss)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trl_reference import f64, masked_mean

from tandem.align.losses import PolicyLossConfig, policy_gradient_loss

B, T = 8, 12
# veRL never sees an empty response (its seq-mean-token-mean would be 0/0), so every row has
# at least two tokens here.
LENGTHS = np.array([12, 7, 2, 2, 5, 12, 3, 9])
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)  # [B, T]


def close(actual, expected, rtol=2e-6, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def verl_kl_penalty(logprob, ref_logprob, kl_penalty):
    logprob, ref_logprob = f64(logprob), f64(ref_logprob)
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob) ** 2
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = np.clip(kl, -20, 20)
        ratio = np.exp(kl)
        kld = ratio - kl - 1
        return np.clip(kld, -10, 10)
    raise ValueError(kl_penalty)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, loss_scale_factor=None):
    loss_mat, loss_mask = f64(loss_mat), f64(loss_mask)
    if loss_agg_mode == "token-mean":
        return masked_mean(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = np.sum(loss_mat * loss_mask, axis=-1)
        return np.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = np.sum(loss_mat * loss_mask, axis=-1) / np.sum(loss_mask, axis=-1)
        return np.mean(seq_losses)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return np.sum(loss_mat * loss_mask) / loss_scale_factor
    raise ValueError(loss_agg_mode)


def verl_policy_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    *,
    cliprange_low=0.2,
    cliprange_high=0.2,
    clip_ratio_c=3.0,
    loss_agg_mode="token-mean",
    rollout_is_weights=None,
):
    """compute_policy_loss_vanilla (dual-clip always on)."""
    old_log_prob, log_prob = f64(old_log_prob), f64(log_prob)
    advantages, response_mask = f64(advantages), f64(response_mask)
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = np.clip(negative_approx_kl, -20.0, 20.0)
    ratio = np.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
    pg_losses = np.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    pg_clipfrac_lower = masked_mean(
        ((clip_pg_losses1 > pg_losses3) & (advantages < 0)).astype(np.float64), response_mask
    )
    return pg_loss, pg_clipfrac_lower


def make_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logps = rng.uniform(-3.0, -0.05, (B, T)).astype(np.float32)
    return {
        "logps": logps,
        "old_logps": (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32),
        "ref_logps": (logps + rng.normal(0, 0.5, (B, T))).astype(np.float32),
        "engine_logps": (logps + rng.normal(0, 0.4, (B, T))).astype(np.float32),
        "advantages": rng.normal(size=(B, T)).astype(np.float32),  # veRL: token advantages
        "mask": MASK,
    }


def ours(batch, cfg):
    keys = ("logps", "old_logps", "advantages", "mask")
    return policy_gradient_loss(
        *(jnp.asarray(batch[k]) for k in keys),
        ref_logps=jnp.asarray(batch["ref_logps"]),
        engine_logps=jnp.asarray(batch["engine_logps"]),
        cfg=cfg,
    )


VERL_AGG = {"dapo": "token-mean", "grpo": "seq-mean-token-mean", "seq_sum": "seq-mean-token-sum"}


def extreme_batch(seed: int, far_reference: bool = True) -> dict[str, np.ndarray]:
    """Tokens far off-policy (and far from the reference), so every clamp engages."""
    batch = make_batch(seed)
    batch["old_logps"][0, :3] = batch["logps"][0, :3] - 25.0  # log rho = +25 -> clamp 20
    batch["advantages"][0, :3] = -np.abs(batch["advantages"][0, :3])  # A < 0: dual clip bites
    batch["old_logps"][1, :2] = batch["logps"][1, :2] + 25.0  # log rho = -25 -> clamp -20
    if far_reference:
        batch["ref_logps"][5, :4] = batch["logps"][5, :4] + 15.0  # k3 = e^15 - 16 -> clamp 10
        batch["ref_logps"][7, :2] = batch["logps"][7, :2] - 30.0  # k3 delta 30 -> clamp 20
    return batch


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("agg", ["dapo", "grpo", "seq_sum"])
def test_matches_verl_dual_clip_kl_and_clamps(agg, estimator):
    # veRL clamps only k3, so k1 and k2 get a reference within reach
    batch = extreme_batch(seed=7, far_reference=estimator == "k3")
    cfg = PolicyLossConfig(
        epsilon_high=0.28,
        dual_clip=3.0,
        loss_agg=agg,
        beta=0.05,
        kl_estimator=estimator,
        kl_clamp=10.0 if estimator == "k3" else None,
        log_ratio_clamp=20.0,
    )
    loss, metrics = ours(batch, cfg)
    pg, dual_fraction = verl_policy_loss(
        batch["old_logps"],
        batch["logps"],
        batch["advantages"],
        batch["mask"],
        cliprange_low=0.2,
        cliprange_high=0.28,
        clip_ratio_c=3.0,
        loss_agg_mode=VERL_AGG[agg],
    )
    kld = verl_kl_penalty(batch["logps"], batch["ref_logps"], estimator)
    want = pg + 0.05 * verl_agg_loss(kld, batch["mask"], VERL_AGG[agg])
    close(loss, want)
    close(metrics["clip_fraction/dual"], dual_fraction)
    assert float(metrics["clip_fraction/dual"]) > 0


def test_matches_verl_truncated_importance_sampling():
    batch = make_batch(seed=11)
    cfg = PolicyLossConfig(dual_clip=3.0, log_ratio_clamp=20.0, tis_cap=2.0)
    loss, metrics = ours(batch, cfg)
    weights = np.minimum(np.exp(batch["old_logps"].astype(np.float64) - batch["engine_logps"]), 2.0)
    want, _ = verl_policy_loss(
        batch["old_logps"],
        batch["logps"],
        batch["advantages"],
        batch["mask"],
        rollout_is_weights=weights,
    )
    close(loss, want)
    close(metrics["is_weight/mean"], (weights * MASK).sum() / MASK.sum())
    assert float(metrics["is_weight/mean"]) != 1.0


def test_clamps_keep_gradient_finite():
    """exp(100) overflows f32. Without clamps the dual clip still caps the loss value, but the
    gradient is 0 * inf = NaN and k3 is inf; the log-ratio and KL clamps keep both finite."""
    batch = make_batch(seed=3)
    batch["old_logps"][0, :3] = batch["logps"][0, :3] - 100.0  # log rho = +100
    batch["advantages"][0, :3] = -1.0
    batch["ref_logps"][5, :4] = batch["logps"][5, :4] + 100.0  # KL delta = -100
    clamped = PolicyLossConfig(dual_clip=3.0, beta=0.1, kl_clamp=10.0, log_ratio_clamp=20.0)
    bare = dataclasses.replace(clamped, kl_clamp=None, log_ratio_clamp=None)

    def grad_of(cfg):
        grad_fn = jax.grad(lambda lp: ours({**batch, "logps": lp}, cfg)[0])
        return np.asarray(grad_fn(jnp.asarray(batch["logps"])))

    assert np.all(np.isfinite(grad_of(clamped)))
    assert not np.all(np.isfinite(grad_of(bare)))
