"""Per-token log-probabilities, entropies and masked statistics.

Alignment convention (every loss relies on it): per-token arrays are `[B, T]` and aligned
with the token ids, so `logps[b, t]` is the log-probability of `tokens[b, t]` given
`tokens[b, :t]`, and a mask over `tokens` masks the logps directly. Position 0 has no
prediction and holds 0.

Masks may be float or bool. Masked-out entries are excluded with `where`, never multiplied
away, so a NaN or inf outside the mask cannot leak into a sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_temperature(temperature) -> None:
    if isinstance(temperature, int | float) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled_logits(logits: jax.Array, temperature) -> jax.Array:
    """logits[:, :-1] / T in f32: the distributions that predict tokens[:, 1:]."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
    _check_temperature(temperature)
    # TRL and Tunix divide by the sampling temperature: the engine sampled from
    # softmax(logits / T), so the ratio and KL must be measured against that distribution.
    return logits[:, :-1].astype(jnp.float32) / temperature  # [B, T-1, V]


def next_token_logprobs(logits: jax.Array, tokens: jax.Array, temperature=1.0) -> jax.Array:
    """Log-probability of each token under the distribution that predicted it.

        out[:, t] = log_softmax(logits[:, t-1] / T)[tokens[:, t]]   for t >= 1
                  = logits[:, t-1, y]/T - logsumexp(logits[:, t-1]/T) ,  y = tokens[:, t]
        out[:, 0] = 0

    Args:
      logits: f32 or bf16 `[B, T, V]`, the model output at every position.
      tokens: i32 `[B, T]`, the sequence the logits were computed on.
      temperature: the sampling temperature T (> 0).

    Returns:
      f32 `[B, T]`. Memory: one f32 copy of the logits; no log_softmax array is built.
    """
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens {tokens.shape} must match logits[:2] {logits.shape[:2]}")
    scaled = _scaled_logits(logits, temperature)  # [B, T-1, V]
    lse = jax.nn.logsumexp(scaled, axis=-1)  # [B, T-1]
    target = tokens[:, 1:, None].astype(jnp.int32)  # [B, T-1, 1]
    picked = jnp.take_along_axis(scaled, target, axis=-1)[..., 0]  # [B, T-1]
    first = jnp.zeros((tokens.shape[0], 1), jnp.float32)  # [B, 1]
    return jnp.concatenate([first, picked - lse], axis=1)  # [B, T]


def next_token_entropy(logits: jax.Array, temperature=1.0) -> jax.Array:
    """Entropy of the distribution that predicted each token, aligned like the logps.

        log p = logits[:, t-1] / T - logsumexp(logits[:, t-1] / T)
        out[:, t] = -sum_v p_v log p_v
        out[:, 0] = 0

    Summed as p * log p rather than logsumexp(x) - sum p x: the latter subtracts two large
    numbers when the logits are large.
    """
    scaled = _scaled_logits(logits, temperature)  # [B, T-1, V]
    logp = scaled - jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # [B, T-1, V]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)  # [B, T-1]
    first = jnp.zeros((logits.shape[0], 1), jnp.float32)  # [B, 1]
    return jnp.concatenate([first, entropy], axis=1)  # [B, T]


def _check_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} must equal values shape {x.shape}")
    return mask.astype(bool)


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * m) over `axis` (all axes when None), in f32."""
    keep = _check_mask(x, mask)
    return jnp.sum(jnp.where(keep, x.astype(jnp.float32), 0.0), axis=axis)


def masked_count(mask: jax.Array, axis=None) -> jax.Array:
    """sum(m) over `axis`, in f32."""
    return jnp.sum(mask.astype(bool).astype(jnp.float32), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """sum(x * m) / max(sum(m), 1) over `axis` (TRL's masked_mean; 0 when all masked)."""
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance over the masked entries (all axes), Bessel-corrected as TRL's masked_var.

        mu = masked_mean(x, m),  n = sum(m)
        var = sum(m (x - mu)^2) / (n - 1)      (unbiased; n when unbiased=False)

    The divisor is clamped to >= 1, so fewer than two entries give a finite value.
    """
    mu = masked_mean(x, mask)
    n = masked_count(mask)
    sq = masked_sum(jnp.square(x.astype(jnp.float32) - mu), mask)
    divisor = n - 1.0 if unbiased else n
    return sq / jnp.maximum(divisor, 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """TRL's masked_whiten: (x - mu) * rsqrt(var + 1e-8), mean and Bessel variance masked.

        out = (x - mu) / sqrt(var + 1e-8)            (shift_mean=True, PPO advantages)
        out = (x - mu) / sqrt(var + 1e-8) + mu       (shift_mean=False, PPO rewards)

    Entries outside the mask are transformed too (as TRL); callers zero them if needed.
    """
    x = x.astype(jnp.float32)
    mu = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mu) * jax.lax.rsqrt(var + 1e-8)
    return out if shift_mean else out + mu


def sequence_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B]: sum_t m lp, the summed completion logprob DPO uses."""
    return masked_sum(logps, mask, axis=-1)


def average_logps(logps: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, T] -> [B]: sum_t m lp / max(sum_t m, 1), the length-normalised logprob of SimPO/ORPO."""
    return masked_mean(logps, mask, axis=-1)
