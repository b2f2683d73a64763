"""Per-token KL estimators between the policy and the reference (Schulman's k1, k2, k3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")


def check_kl_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_estimate(
    logps: jax.Array,
    ref_logps: jax.Array,
    estimator: str = "k3",
    clamp: float | None = None,
    *,
    log_ratio_clamp: float | None = None,
) -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

        delta = lp - rlp                       (clipped to +-log_ratio_clamp when set)
        k1 = delta                             (unbiased, high variance; PPO in-reward default)
        k2 = delta^2 / 2                       (biased, low variance)
        k3 = exp(-delta) + delta - 1           (unbiased, >= 0; GRPO default, TRL's
                                                exp(rlp - lp) - (rlp - lp) - 1)
        out = clip(k, -clamp, clamp)           (when clamp is set; veRL clamps k3 to +-10)

    `log_ratio_clamp` (veRL: 20) keeps exp(-delta) finite, so a far-off token cannot turn the
    gradient into inf * 0 = NaN even when `clamp` caps the value.

    Args:
      logps, ref_logps: f32 `[B, T]`.
    Returns:
      f32 `[B, T]`, unmasked.
    """
    check_kl_estimator(estimator)
    if logps.shape != ref_logps.shape:
        raise ValueError(f"ref_logps {ref_logps.shape} must match logps {logps.shape}")
    delta = logps.astype(jnp.float32) - ref_logps.astype(jnp.float32)  # [B, T]
    if log_ratio_clamp is not None:
        delta = jnp.clip(delta, -log_ratio_clamp, log_ratio_clamp)
    if estimator == "k1":
        kl = delta
    elif estimator == "k2":
        kl = 0.5 * jnp.square(delta)
    else:
        kl = jnp.exp(-delta) + delta - 1.0
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    return kl
