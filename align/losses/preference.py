"""Pairwise preference losses: DPO (sigmoid, IPO, hinge, robust), SimPO, ORPO, Bradley-Terry.

Each pair loss is a mean over pairs, so its `normalizer` is the whole batch's pair count,
`loss_denominator(pairs, "seq_mean")`. Inputs are per-pair `[B]` values (summed or averaged
completion logprobs from logprobs.sequence_logps / average_logps), except ORPO, which needs
the chosen tokens for its NLL term.

Metrics (local means, not differentiated): `rewards/chosen`, `rewards/rejected`,
`rewards/accuracy` (fraction of pairs with chosen reward > rejected reward) and
`rewards/margin` (mean of chosen - rejected reward). The reward is the loss's implicit
reward: beta * s for DPO (s = lp - rlp), beta * average logp for SimPO and ORPO, r for RM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tandem.align.logprobs import average_logps, masked_count, masked_sum
from tandem.align.losses.aggregation import divide
from tandem.align.registry import register

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _check_pairs(**arrays: jax.Array | None) -> None:
    shape = None
    for name, x in arrays.items():
        if x is None:
            continue
        if x.ndim != 1:
            raise ValueError(f"{name} must be a per-pair [B] array, got shape {x.shape}")
        if shape is not None and x.shape != shape:
            raise ValueError(f"{name} {x.shape} must match the other pair arrays {shape}")
        shape = x.shape


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _pair_mean(losses: jax.Array, normalizer) -> jax.Array:
    """sum_i l_i / (normalizer or B): the seq_mean aggregation."""
    return divide(jnp.sum(losses), jnp.float32(losses.shape[0]), normalizer)


def _reward_metrics(chosen: jax.Array, rejected: jax.Array) -> dict[str, jax.Array]:
    chosen, rejected = jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)
    return {
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "rewards/margin": jnp.mean(chosen - rejected),
    }


def _f32(*arrays):
    return [x.astype(jnp.float32) for x in arrays]


@register("loss", "dpo")
def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO-family loss on summed completion logprobs (TRL DPOTrainer, `dpo_loss`).

        s_w = lp(y_w) - rlp(y_w),  s_l = lp(y_l) - rlp(y_l),  D = s_w - s_l,  e = label_smoothing
        sigmoid: -(1 - e) log sig(beta D) - e log sig(-beta D)    (e = 0: TRL; e > 0: cDPO)
        robust:  (-(1 - e) log sig(beta D) + e log sig(-beta D)) / (1 - 2e)   (rDPO)
        hinge:   max(0, 1 - beta D)                               (SLiC)
        ipo:     (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2      (TRL's length-normalised IPO)
        loss = sum_i l_i / B                                      (or / normalizer)

    At policy == reference D = 0 and the sigmoid loss is exactly ln 2.

    Args:
      chosen_logps, rejected_logps: f32 `[B]` summed completion logprobs of the policy.
      ref_chosen_logps, ref_rejected_logps: f32 `[B]` the same under the reference.
      beta: the KL-strength temperature (IPO's tau).
      loss_type: one of DPO_LOSS_TYPES.
      label_smoothing: e in [0, 0.5); only for 'sigmoid' and 'robust'.
      chosen_lengths, rejected_lengths: `[B]` completion token counts (clamped to >= 1);
        required for 'ipo'.
      normalizer: whole-batch pair count.
    """
    _check_pairs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    _check_beta(beta)
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing has no meaning for loss_type {loss_type!r}")
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths")

    lp_w, lp_l, rlp_w, rlp_l = _f32(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    s_w = lp_w - jax.lax.stop_gradient(rlp_w)  # [B]
    s_l = lp_l - jax.lax.stop_gradient(rlp_l)  # [B]
    logits = beta * (s_w - s_l)  # [B]
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1.0 - e) * jax.nn.log_sigmoid(logits) - e * jax.nn.log_sigmoid(-logits)
    elif loss_type == "robust":
        losses = (-(1.0 - e) * jax.nn.log_sigmoid(logits) + e * jax.nn.log_sigmoid(-logits)) / (
            1.0 - 2.0 * e
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - logits)
    else:
        len_w = jnp.maximum(chosen_lengths.astype(jnp.float32), 1.0)
        len_l = jnp.maximum(rejected_lengths.astype(jnp.float32), 1.0)
        losses = jnp.square(s_w / len_w - s_l / len_l - 1.0 / (2.0 * beta))
    return _pair_mean(losses, normalizer), _reward_metrics(beta * s_w, beta * s_l)


@register("loss", "simpo")
def simpo_loss(
    chosen_avg_logps: jax.Array,
    rejected_avg_logps: jax.Array,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SimPO, reference-free, on length-averaged logprobs (TRL CPOTrainer loss_type='simpo').

        z = beta (a_w - a_l) - gamma          (TRL: beta * ((a_w - a_l) - gamma / beta))
        l = -(1 - e) log sig(z) - e log sig(-z)
        loss = sum_i l_i / B                  (or / normalizer)

    This is the pure SimPO objective: TRL's CPOTrainer adds cpo_alpha * NLL(chosen) on top
    (cpo_alpha defaults to 1.0 there; the SimPO recipe sets it to 0). Defaults are TRL's
    CPOConfig (beta=0.1, simpo_gamma=0.5); the SimPO paper uses beta in 2-10.

    Args:
      chosen_avg_logps, rejected_avg_logps: f32 `[B]` from logprobs.average_logps.
    """
    _check_pairs(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    _check_beta(beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    a_w, a_l = _f32(chosen_avg_logps, rejected_avg_logps)
    z = beta * (a_w - a_l) - gamma  # [B]
    e = label_smoothing
    losses = -(1.0 - e) * jax.nn.log_sigmoid(z) - e * jax.nn.log_sigmoid(-z)
    return _pair_mean(losses, normalizer), _reward_metrics(beta * a_w, beta * a_l)


def _log1m_exp(a: jax.Array) -> jax.Array:
    """log(1 - exp(a)) for a < 0; -expm1 keeps precision when a is close to 0 (p near 1)."""
    return jnp.log(-jnp.expm1(a))


@register("loss", "orpo")
def orpo_loss(
    chosen_logps: jax.Array,
    chosen_mask: jax.Array,
    rejected_logps: jax.Array,
    rejected_mask: jax.Array,
    *,
    beta: float = 0.1,
    normalizer: jax.Array | None = None,
    nll_normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ORPO: chosen NLL plus the odds-ratio term (TRL ORPOTrainer, `odds_ratio_loss`).

        a = sum_t m lp / max(sum_t m, 1)                  (average completion logprob)
        log_odds = (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))
        NLL  = sum_{i,t} m_w (-lp_w) / sum m_w            (token mean over chosen completions)
        loss = NLL - beta * sum_i log sig(log_odds_i) / B

    The two terms have different denominators, so accumulation needs both:
    `normalizer` = whole-batch pair count (`loss_denominator(chosen_mask, "seq_mean")`) and
    `nll_normalizer` = whole-batch chosen token count
    (`loss_denominator(chosen_mask, "token_mean")`). Each falls back to its local value.

    Args:
      chosen_logps, rejected_logps: f32 `[B, T]` per-token logprobs (aligned with the masks).
      chosen_mask, rejected_mask: `[B, T]` completion masks.
      beta: the paper's lambda (TRL default 0.1).
    Returns:
      (loss, metrics): the reward metrics (beta * a), `nll`, `log_odds_ratio` (mean log sig
      of the log odds) and `log_odds` (mean).
    """
    if chosen_logps.ndim != 2 or chosen_mask.shape != chosen_logps.shape:
        raise ValueError(
            f"chosen_logps {chosen_logps.shape} and chosen_mask {chosen_mask.shape} must be [B, T]"
        )
    if rejected_logps.ndim != 2 or rejected_mask.shape != rejected_logps.shape:
        raise ValueError(
            f"rejected_logps {rejected_logps.shape} and rejected_mask {rejected_mask.shape} "
            "must be [B, T]"
        )
    if rejected_logps.shape[0] != chosen_logps.shape[0]:
        raise ValueError(
            f"chosen ({chosen_logps.shape[0]}) and rejected ({rejected_logps.shape[0]}) "
            "pair counts differ"
        )
    _check_beta(beta)
    a_w = average_logps(chosen_logps, chosen_mask)  # [B]
    a_l = average_logps(rejected_logps, rejected_mask)  # [B]
    log_odds = (a_w - a_l) - (_log1m_exp(a_w) - _log1m_exp(a_l))  # [B]
    ratio = jax.nn.log_sigmoid(log_odds)  # [B]
    nll_sum = -masked_sum(chosen_logps, chosen_mask)
    nll = divide(nll_sum, jnp.maximum(masked_count(chosen_mask), 1.0), nll_normalizer)
    loss = nll + _pair_mean(-beta * ratio, normalizer)
    metrics = _reward_metrics(beta * a_w, beta * a_l)
    metrics["nll"] = jax.lax.stop_gradient(nll)
    metrics["log_odds_ratio"] = jnp.mean(jax.lax.stop_gradient(ratio))
    metrics["log_odds"] = jnp.mean(jax.lax.stop_gradient(log_odds))
    return loss, metrics


@register("loss", "bradley_terry")
def bradley_terry_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_rewards_coefficient: float | None = None,
    normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reward-model pairwise loss (TRL RewardTrainer.compute_loss).

        l_i  = -log sig(r_w - r_l - margin_i)               (margin optional, per pair)
             + c (r_w + r_l)^2                              (center_rewards_coefficient c)
        loss = sum_i l_i / B                                (or / normalizer)

    The centering term pulls the mean reward toward 0 (Eisenstein et al. 2023), since the
    pairwise term only sees differences.

    Args:
      chosen_rewards, rejected_rewards: f32 `[B]` scalar rewards of the reward head.
      margin: optional f32 `[B]` required gap.
    """
    _check_pairs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, margin=margin)
    r_w, r_l = _f32(chosen_rewards, rejected_rewards)
    gap = r_w - r_l if margin is None else r_w - r_l - margin.astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(gap)  # [B]
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * jnp.square(r_w + r_l)
    return _pair_mean(losses, normalizer), _reward_metrics(r_w, r_l)
