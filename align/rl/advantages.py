"""Advantages and rewards: group-relative (GRPO, Dr.GRPO, RLOO), GAE and PPO token rewards.

Group layout (as TRL's RepeatSampler produces it): the `G` completions of one prompt are
contiguous, so `rewards[p * G : (p + 1) * G]` is prompt p's group.

The outcome estimators (one reward per completion) are in the registry under the category
"advantage", and every one is called the same way:

    get_advantage(name)(rewards f32[B], group_size, scale=..., epsilon=...) -> f32[B]

so a trainer never branches on the name. Only 'grpo' divides by a std; the others take
`scale` and `epsilon` and leave them unused. GAE (PPO with a value head) has its own
signature and is called directly.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tandem.align import registry
from tandem.align.losses.kl import kl_estimate
from tandem.align.registry import register

GROUP_SCALES = ("group", "batch", "none")


def get_advantage(name: str) -> Callable:
    """The registered advantage estimator `name`; a ValueError lists the known names otherwise."""
    return registry.get("advantage", name)


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    """f32 [B] -> [P, G] with P = B / G prompts."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {rewards.shape}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch {rewards.shape[0]} is not a multiple of group_size {group_size}")
    return rewards.astype(jnp.float32).reshape(-1, group_size)  # [P, G]


def _std(centered: jax.Array, ddof: int) -> jax.Array:
    """sqrt(sum c^2 / (n - ddof)) over the last axis; 0 when n - ddof <= 0 (TRL: G = 1)."""
    dof = centered.shape[-1] - ddof
    if dof <= 0:
        return jnp.zeros(centered.shape[:-1] + (1,), jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(centered), axis=-1, keepdims=True) / dof)


@register("advantage", "grpo")
def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: str = "group",
    epsilon: float = 1e-4,
    ddof: int = 1,
) -> jax.Array:
    """Group-normalised outcome advantages (TRL GRPOTrainer, scale_rewards).

        A_i = (r_i - mean_g r) / (std + epsilon)
        std = std_g r (scale='group'), std over the whole batch (scale='batch', the mean is
              still the group's), or no division at all (scale='none', Dr.GRPO)

    std uses ddof (1: Bessel, as TRL, Tunix, veRL and OpenRLHF). A singleton group (or batch)
    has std 0 and r - mean = 0, so A = 0. The epsilon is where libraries differ: TRL 1e-4,
    Tunix and veRL 1e-6, OpenRLHF 1e-9. Rewards must be finite (TRL's NaN rewards for
    "no reward function applies" are the caller's to replace).

    Args:
      rewards: f32 `[B]`, B a multiple of group_size, groups contiguous.
      group_size: G, completions per prompt.
    Returns:
      f32 `[B]`.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES}, got {scale!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 or 1, got {ddof}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    grouped = _grouped(rewards, group_size)  # [P, G]
    centered = grouped - jnp.mean(grouped, axis=-1, keepdims=True)  # [P, G]
    if scale == "none":
        return centered.reshape(-1)
    if scale == "group":
        std = _std(centered, ddof)  # [P, 1]
    else:
        flat = grouped.reshape(1, -1)  # [1, B]
        std = _std(flat - jnp.mean(flat), ddof)  # [1, 1]
    return (centered / (std + epsilon)).reshape(-1)


@register("advantage", "dr_grpo")
def dr_grpo_advantages(
    rewards: jax.Array, group_size: int, *, scale: str = "group", epsilon: float = 1e-4
) -> jax.Array:
    """Dr.GRPO: A_i = r_i - mean_g r (no std division, so `scale` and `epsilon` do not apply;
    removes the difficulty bias)."""
    del scale, epsilon
    grouped = _grouped(rewards, group_size)  # [P, G]
    return (grouped - jnp.mean(grouped, axis=-1, keepdims=True)).reshape(-1)


@register("advantage", "rloo")
def rloo_advantages(
    rewards: jax.Array, group_size: int, *, scale: str = "group", epsilon: float = 1e-4
) -> jax.Array:
    """REINFORCE leave-one-out: A_i = r_i - (sum_j r_j - r_i) / (G - 1) = G/(G-1) (r_i - mean_g).
    No std division, so `scale` and `epsilon` do not apply."""
    del scale, epsilon
    if isinstance(group_size, int) and group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    grouped = _grouped(rewards, group_size)  # [P, G]
    baseline = (jnp.sum(grouped, axis=-1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def _through_last(mask: jax.Array) -> jax.Array:
    """bool [B, T]: positions at or before each row's last masked position."""
    m = mask.astype(jnp.int32)
    return jnp.flip(jnp.cumsum(jnp.flip(m, axis=1), axis=1), axis=1) > 0


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the completion (TRL PPOTrainer step 6).

        delta_t = r_t + gamma V_{t+1} - V_t          (V_T = 0)
        A_t     = delta_t + gamma lam A_{t+1}        (scanned backwards)
        R_t     = A_t + V_t

    Values and rewards after each row's last masked token are zeroed first (TRL zeroes
    values past the EOS position), so nothing beyond the completion is bootstrapped and A, R
    are 0 there. Holes inside the mask (tool tokens) keep their values. TRL then whitens A
    with masked_whiten(A, mask); do that in the caller.

    Args:
      rewards: f32 `[B, T]` per-token rewards (ppo_token_rewards).
      values: f32 `[B, T]` value-head predictions at rollout time.
      mask: `[B, T]` completion mask.
    Returns:
      (advantages f32 `[B, T]`, returns f32 `[B, T]`), not differentiated.
    """
    if rewards.ndim != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(
            f"rewards {rewards.shape}, values {values.shape} and mask {mask.shape} must be "
            "equal [B, T] shapes"
        )
    live = _through_last(mask)  # [B, T]
    r = jnp.where(live, jax.lax.stop_gradient(rewards).astype(jnp.float32), 0.0)
    v = jnp.where(live, jax.lax.stop_gradient(values).astype(jnp.float32), 0.0)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)  # [B, T]
    deltas = r + gamma * next_v - v  # [B, T]

    def step(carry, delta_t):  # carry, delta_t: [B]
        adv_t = delta_t + gamma * lam * carry
        return adv_t, adv_t

    _, adv_tb = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = adv_tb.T  # [T, B] -> [B, T]
    return advantages, advantages + v


def ppo_token_rewards(
    scores: jax.Array,
    logps: jax.Array,
    ref_logps: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float = 0.05,
    kl_estimator: str = "k1",
    missing_eos_penalty: float | None = None,
    has_eos: jax.Array | None = None,
) -> jax.Array:
    """Per-token PPO rewards: a KL penalty on every token, the score on the last one.

        score_i = scores_i - missing_eos_penalty * [no EOS in completion i]
        r_t     = -kl_coef * KL_t                  (KL_t = kl_estimate(lp, rlp), on masked tokens)
        r_last += score_i                          (last masked token: the EOS, or the final
                                                    token of a truncated completion)

    TRL (pad == EOS) truncates after the EOS and puts the score at seq_len + 1, which is this
    same EOS position; but because its EOS is also the pad it drops the EOS token's own KL,
    which is kept here (the EOS is a sampled token, and the mask includes it).

    Args:
      scores: f32 `[B]` reward-model / verifier scores.
      logps, ref_logps: f32 `[B, T]` rollout logprobs of the policy and the reference.
      mask: `[B, T]` completion mask (1 up to and including the EOS).
      has_eos: bool `[B]`; required with missing_eos_penalty.
    Returns:
      f32 `[B, T]`, zero outside the mask (rows with an empty mask get nothing).
    """
    if logps.ndim != 2 or ref_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError(
            f"logps {logps.shape}, ref_logps {ref_logps.shape} and mask {mask.shape} must be "
            "equal [B, T] shapes"
        )
    if scores.shape != logps.shape[:1]:
        raise ValueError(f"scores must be [B] = {logps.shape[:1]}, got {scores.shape}")
    if missing_eos_penalty is not None and has_eos is None:
        raise ValueError("missing_eos_penalty needs has_eos")
    if has_eos is not None and has_eos.shape != scores.shape:
        raise ValueError(f"has_eos must be [B] = {scores.shape}, got {has_eos.shape}")
    keep = mask.astype(bool)  # [B, T]
    lp = jnp.where(keep, logps.astype(jnp.float32), 0.0)
    rlp = jnp.where(keep, ref_logps.astype(jnp.float32), 0.0)
    rewards = jnp.where(keep, -kl_coef * kl_estimate(lp, rlp, kl_estimator), 0.0)  # [B, T]
    score = scores.astype(jnp.float32)  # [B]
    if missing_eos_penalty is not None:
        score = score - missing_eos_penalty * (~has_eos.astype(bool)).astype(jnp.float32)
    num_tokens = keep.shape[1]
    last = num_tokens - 1 - jnp.argmax(jnp.flip(keep, axis=1), axis=1)  # [B]
    at_last = jax.nn.one_hot(last, num_tokens, dtype=jnp.float32)  # [B, T]
    at_last = at_last * jnp.any(keep, axis=1, keepdims=True)  # empty rows: no score
    return jax.lax.stop_gradient(rewards + at_last * score[:, None])


def soft_overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
    """DAPO soft overlong punishment (TRL other_rewards.get_soft_overlong_punishment).

        R(L) = 0                                  L <= max_len - cache_len
             = (max_len - cache_len - L) / cache_len   max_len - cache_len < L <= max_len
             = -1                                 L > max_len

    Args:
      lengths: i32 `[B]` completion lengths in tokens.
      max_len: L_max (DAPO: 20480). cache_len: L_cache (DAPO: 4096), 0 < cache_len <= max_len.
    Returns:
      f32 `[B]`, a reward to add to the task reward.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}"
        )
    length = lengths.astype(jnp.float32)
    start = float(max_len - cache_len)
    ramp = (start - length) / cache_len
    return jnp.where(length <= start, 0.0, jnp.where(length <= max_len, ramp, -1.0))
