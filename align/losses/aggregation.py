"""How per-token (or per-pair) losses become one scalar, and the gradient-accumulation contract.

Every loss is `numerator / denominator`. The numerator is a plain sum over rows, so it splits
across micro-batches. The denominator is a whole-batch count. A loss called with
`normalizer=None` divides by its own local denominator. A loss called with `normalizer=N`
divides the SAME numerator by N instead. A trainer that computes
`N = loss_denominator(full_batch_mask, agg, ...)` once per optimizer batch and passes it to
every micro-batch gets micro-batch losses (and gradients) that SUM to the full-batch loss.

Aggregation modes (`m` the mask, `l` the per-token loss, `n_i = sum_t m[i, t]`, `B` rows):

| agg        | numerator                                | denominator (loss_denominator) |
|------------|------------------------------------------|--------------------------------|
| grpo       | sum_i (sum_t m l) / max(n_i, 1)          | B (every row, empty rows too, as TRL) |
| bnpo       | sum_{i,t} m l                            | max(sum m, 1)                  |
| dapo       | sum_{i,t} m l                            | max(sum m, 1)                  |
| dr_grpo    | sum_{i,t} m l                            | B * max_completion_length      |
| seq_sum    | sum_{i,t} m l                            | B                              |
| token_mean | sum_{i,t} m l   (SFT, PPO, ORPO's NLL)   | max(sum m, 1)                  |
| seq_mean   | sum_i l_i       (pairs: DPO, SimPO, RM)  | B                              |

`grpo` is DeepSeekMath's per-sequence token mean, then the mean over sequences (TRL's
`grpo`, Tunix's `sequence-mean-token-mean`, veRL's `seq-mean-token-mean`). TRL's `dr_grpo`
divides each micro-batch by its own B * L and then by the accumulation steps, which is the
same as B_total * L here.

`bnpo` vs `dapo`: TRL's `bnpo` divides by the token count of the LOCAL micro-batch (so the
result depends on how the batch is cut), while `dapo` divides by the token count of the whole
accumulated batch (TRL's `num_items_in_batch`). Called without a normalizer, the two are
identical here (a local token mean). Given the whole-batch normalizer, `bnpo` becomes the
global token mean, i.e. exactly `dapo`; no trainer needs the micro-batch-dependent variant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.align.logprobs import masked_count, masked_sum

AGGREGATIONS = ("grpo", "bnpo", "dapo", "dr_grpo", "seq_sum", "token_mean", "seq_mean")
_TOKEN_COUNT = ("bnpo", "dapo", "token_mean")
_ROW_COUNT = ("grpo", "seq_sum", "seq_mean")


def check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {agg!r}")


def _check_max_len(max_completion_length) -> int:
    if max_completion_length is None:
        raise ValueError("aggregation 'dr_grpo' needs max_completion_length (the constant L)")
    if int(max_completion_length) < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    return int(max_completion_length)


def loss_denominator(
    mask: jax.Array, agg: str, *, max_completion_length: int | None = None
) -> jax.Array:
    """The whole batch's denominator for `agg` (table in the module docstring), f32 scalar.

    Args:
      mask: `[B, T]` completion mask of the WHOLE optimizer batch; for `seq_mean` (pair losses)
        anything with the pair axis first, e.g. `[B]`.
      agg: one of AGGREGATIONS.
      max_completion_length: L, required for `dr_grpo`.
    """
    check_agg(agg)
    if agg in _TOKEN_COUNT:
        return jnp.maximum(masked_count(mask), 1.0)
    num_rows = jnp.float32(mask.shape[0])
    if agg in _ROW_COUNT:
        return num_rows
    return num_rows * _check_max_len(max_completion_length)


def divide(numerator: jax.Array, local_denominator: jax.Array, normalizer) -> jax.Array:
    """numerator / (normalizer if given else local_denominator), in f32."""
    denominator = local_denominator if normalizer is None else normalizer
    return numerator / jnp.asarray(denominator, jnp.float32)


def aggregate(
    per_token: jax.Array,
    mask: jax.Array,
    agg: str,
    *,
    normalizer=None,
    max_completion_length: int | None = None,
) -> jax.Array:
    """Reduce a `[B, T]` per-token loss to a scalar with `agg` (module docstring table).

    With `normalizer=None` the denominator is `loss_denominator(mask, agg, ...)` of this
    batch; otherwise `normalizer`.
    """
    check_agg(agg)
    if agg == "seq_mean":
        raise ValueError("'seq_mean' reduces per-pair losses [B], not per-token losses")
    if per_token.shape != mask.shape or per_token.ndim != 2:
        raise ValueError(f"per-token loss {per_token.shape} and mask {mask.shape} must be [B, T]")
    if agg == "grpo":
        row_sum = masked_sum(per_token, mask, axis=-1)  # [B]
        row_len = jnp.maximum(masked_count(mask, axis=-1), 1.0)  # [B]
        numerator = jnp.sum(row_sum / row_len)
    else:
        numerator = masked_sum(per_token, mask)
    local = loss_denominator(mask, agg, max_completion_length=max_completion_length)
    return divide(numerator, local, normalizer)
