"""Supervised fine-tuning: masked token cross-entropy from per-token logprobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.align.logprobs import masked_count
from tandem.align.losses.aggregation import aggregate
from tandem.align.registry import register


@register("loss", "sft")
def sft_loss(
    logps: jax.Array,
    mask: jax.Array,
    *,
    normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean negative log-likelihood of the completion tokens.

        loss = sum_{i,t} m (-lp) / max(sum m, 1)      (or / normalizer = whole-batch token count,
                                                       loss_denominator(mask, "token_mean"))

    Packing is the caller's business: with segment ids the logps of a packed row are already
    per-segment, and the mask zeroes prompts, padding and each segment's first token.

    Args:
      logps: f32 `[B, T]` from next_token_logprobs (aligned with `mask`).
      mask: `[B, T]` 1 on the tokens to learn.
    Returns:
      (loss, metrics): `nll` (local token mean) and `num_tokens` (local count).
    """
    if logps.ndim != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps {logps.shape} and mask {mask.shape} must both be [B, T]")
    loss = aggregate(-logps.astype(jnp.float32), mask, "token_mean", normalizer=normalizer)
    local_nll = aggregate(-jax.lax.stop_gradient(logps).astype(jnp.float32), mask, "token_mean")
    return loss, {"nll": local_nll, "num_tokens": masked_count(mask)}
