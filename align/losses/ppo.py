"""PPO (RLHF) losses: the clipped policy surrogate and the clipped value loss (TRL PPOTrainer).

Both are token means over the completion mask, so their `normalizer` is the whole batch's
token count, `loss_denominator(mask, "token_mean")`. TRL adds them as pg + vf_coef * vf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.align.logprobs import masked_mean
from tandem.align.losses.aggregation import aggregate
from tandem.align.registry import register


def _check_same(ref_name: str, ref: jax.Array, **arrays: jax.Array) -> None:
    if ref.ndim != 2:
        raise ValueError(f"{ref_name} must be [B, T], got shape {ref.shape}")
    for name, x in arrays.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} {x.shape} must match {ref_name} {ref.shape}")


def _check_clip(clip: float) -> None:
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")


@register("loss", "ppo_policy")
def ppo_policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip: float = 0.2,
    normalizer: jax.Array | None = None,
    *,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate, token mean (TRL ppo_trainer.py `pg_loss`).

        rho  = exp(lp - olp)
        l_t  = max(-A_t rho, -A_t clip(rho, 1 - clip, 1 + clip))
        loss = sum m l / max(sum m, 1)            (or / normalizer)

    Args:
      logps, old_logps: f32 `[B, T]`; old_logps is not differentiated.
      advantages: f32 `[B, T]` (from `gae`, usually whitened with masked_whiten).
      mask: `[B, T]` completion mask.
    Returns:
      (loss, metrics): `clip_fraction`, `approx_kl` (masked mean of 0.5 (log rho)^2),
      `ratio/mean`, and `entropy` when given.
    """
    _check_same("logps", logps, old_logps=old_logps, advantages=advantages, mask=mask)
    _check_clip(clip)
    keep = mask.astype(bool)
    lp = jnp.where(keep, logps.astype(jnp.float32), 0.0)
    olp = jnp.where(keep, jax.lax.stop_gradient(old_logps).astype(jnp.float32), 0.0)
    adv = jnp.where(keep, advantages.astype(jnp.float32), 0.0)
    log_ratio = lp - olp  # [B, T]
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)  # [B, T]
    loss = aggregate(jnp.maximum(unclipped, clipped), keep, "token_mean", normalizer=normalizer)
    log_ratio = jax.lax.stop_gradient(log_ratio)
    metrics = {
        "clip_fraction": masked_mean(jax.lax.stop_gradient(clipped > unclipped), keep),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), keep),
        "ratio/mean": masked_mean(jnp.exp(log_ratio), keep),
    }
    if entropy is not None:
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropy), keep)
    return loss, metrics


@register("loss", "ppo_value")
def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip: float = 0.2,
    normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss (TRL ppo_trainer.py `vf_loss`).

        V_c  = clip(V, V_old - clip, V_old + clip)
        l_t  = 0.5 * max((V - R)^2, (V_c - R)^2)
        loss = sum m l / max(sum m, 1)            (or / normalizer)

    Args:
      values: f32 `[B, T]` current value predictions (differentiated).
      old_values: f32 `[B, T]` values at rollout time; returns: f32 `[B, T]` (from `gae`).
    Returns:
      (loss, metrics): `value_clip_fraction`, `value/mean`, `value/error` (masked mean (V-R)^2).
    """
    _check_same("values", values, old_values=old_values, returns=returns, mask=mask)
    _check_clip(clip)
    keep = mask.astype(bool)
    v = jnp.where(keep, values.astype(jnp.float32), 0.0)
    v_old = jnp.where(keep, jax.lax.stop_gradient(old_values).astype(jnp.float32), 0.0)
    ret = jnp.where(keep, jax.lax.stop_gradient(returns).astype(jnp.float32), 0.0)
    v_clipped = jnp.clip(v, v_old - clip, v_old + clip)
    err = jnp.square(v - ret)  # [B, T]
    err_clipped = jnp.square(v_clipped - ret)  # [B, T]
    per_token = 0.5 * jnp.maximum(err, err_clipped)
    loss = aggregate(per_token, keep, "token_mean", normalizer=normalizer)
    metrics = {
        "value_clip_fraction": masked_mean(jax.lax.stop_gradient(err_clipped > err), keep),
        "value/mean": masked_mean(jax.lax.stop_gradient(v), keep),
        "value/error": masked_mean(jax.lax.stop_gradient(err), keep),
    }
    return loss, metrics
