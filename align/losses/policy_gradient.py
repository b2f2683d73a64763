"""The GRPO family as one configurable clipped policy-gradient loss (GRPO, DAPO, Dr.GRPO, GSPO).

Every knob on which TRL, Tunix, veRL and OpenRLHF differ is a field of `PolicyLossConfig`;
the presets at the bottom pin the published recipes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tandem.align.logprobs import masked_mean
from tandem.align.losses.aggregation import aggregate, check_agg
from tandem.align.losses.kl import check_kl_estimator, kl_estimate
from tandem.align.registry import register


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Options of `policy_gradient_loss`. Frozen and hashable, so it can be a static jit arg."""

    epsilon_low: float = 0.2
    """Lower clip: the ratio is clipped to >= 1 - epsilon_low."""
    epsilon_high: float = 0.2
    """Upper clip: the ratio is clipped to <= 1 + epsilon_high (DAPO clip-higher: 0.28)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 (veRL: 3.0). For A < 0 the loss is min(loss, -c * A)."""
    delta: float | None = None
    """TRL/INTELLECT-2 two-sided clip: the unclipped term uses min(rho, delta); > 1 + eps_high."""
    importance_sampling_level: str = "token"
    """'token': rho_t = exp(lp - olp).
    'sequence' (GSPO): rho_i = exp(sum_t m (lp - olp) / max(sum_t m, 1)), one ratio per row."""
    loss_agg: str = "dapo"
    """Aggregation: 'grpo', 'bnpo', 'dapo', 'dr_grpo' or 'seq_sum' (see aggregation.py)."""
    max_completion_length: int | None = None
    """L of the Dr.GRPO constant denominator B * L; required for loss_agg='dr_grpo'."""
    beta: float = 0.0
    """KL coefficient. beta * KL_t is added to every token's loss and aggregated with it."""
    kl_estimator: str = "k3"
    """'k1', 'k2' or 'k3' (see kl.kl_estimate)."""
    kl_clamp: float | None = None
    """Clamp the per-token KL to [-kl_clamp, kl_clamp] (veRL: 10). None: unclamped (TRL)."""
    log_ratio_clamp: float | None = None
    """Clamp log rho (and the KL log-ratio) to +-this before exp (Tunix, veRL: 20; TRL: None)."""
    tis_cap: float | None = None
    """Truncated importance sampling: w_t = min(exp(olp - engine_lp), cap) multiplies the
    policy term, correcting for the engine's logprobs differing from the trainer's."""

    def __post_init__(self):
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        if self.delta is not None and self.delta <= 1:
            raise ValueError(f"delta must be > 1, got {self.delta}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "importance_sampling_level must be 'token' or 'sequence', got "
                f"{self.importance_sampling_level!r}"
            )
        check_agg(self.loss_agg)
        if self.loss_agg in ("token_mean", "seq_mean"):
            raise ValueError(f"loss_agg {self.loss_agg!r} is not a policy-gradient aggregation")
        check_kl_estimator(self.kl_estimator)
        for name in ("kl_clamp", "log_ratio_clamp", "tis_cap"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def _check_shapes(logps, old_logps, advantages, mask, ref_logps, engine_logps) -> None:
    if logps.ndim != 2:
        raise ValueError(f"logps must be [B, T], got shape {logps.shape}")
    for name, x in (("old_logps", old_logps), ("mask", mask)):
        if x.shape != logps.shape:
            raise ValueError(f"{name} {x.shape} must match logps {logps.shape}")
    for name, x in (("ref_logps", ref_logps), ("engine_logps", engine_logps)):
        if x is not None and x.shape != logps.shape:
            raise ValueError(f"{name} {x.shape} must match logps {logps.shape}")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"advantages must be [B] or [B, T], got {advantages.shape}")


def _batch_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's masked_batch_mean: [B, 1] -> mean over rows; [B, T] -> masked token mean."""
    if x.shape[1] == 1:
        return jnp.mean(x.astype(jnp.float32))
    return masked_mean(x, mask)


def _batch_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    if x.shape[1] == 1:
        return jnp.max(x)
    return jnp.max(jnp.where(mask, x, 0.0))  # ratios are > 0, so 0 marks 'no token'


@register("loss", "grpo")
def policy_gradient_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    ref_logps: jax.Array | None = None,
    engine_logps: jax.Array | None = None,
    cfg: PolicyLossConfig,
    normalizer: jax.Array | None = None,
    entropy: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate loss of the GRPO family (TRL `GRPOTrainer._compute_loss`).

        log rho = lp - olp                                   (token level)
                = sum_t m(lp - olp) / max(sum_t m, 1)        (sequence level, GSPO)
        rho     = exp(clip(log rho, -c_lr, c_lr))            (clip only when log_ratio_clamp)
        coef1   = min(rho, delta) if delta else rho
        coef2   = clip(rho, 1 - eps_low, 1 + eps_high)
        l_t     = -min(coef1 * A, coef2 * A)
        l_t     = min(l_t, -c * A)            where A < 0    (dual_clip = c)
        l_t     = l_t * min(exp(olp - elp), cap)             (tis_cap, engine logps elp)
        l_t     = l_t + beta * KL_t                          (beta != 0; KL from kl_estimate)
        loss    = aggregate(l, m, loss_agg, normalizer)      (aggregation.py)

    Pass `old_logps = jax.lax.stop_gradient(logps)` for the first (on-policy) update: rho is
    1 but the gradient flows, -A * m / denominator per token.

    Args:
      logps: f32 `[B, T]` policy logprobs (aligned with `mask`, see logprobs.py).
      old_logps: f32 `[B, T]` logprobs of the policy that sampled (or recomputed before the
        update). Not differentiated.
      advantages: f32 `[B]` (one per completion) or `[B, T]`.
      mask: `[B, T]` completion mask.
      ref_logps: f32 `[B, T]`; required when cfg.beta != 0, else only logged.
      engine_logps: f32 `[B, T]` logprobs reported by the rollout engine; required with
        cfg.tis_cap.
      cfg: the options.
      normalizer: whole-batch denominator (`loss_denominator(mask, cfg.loss_agg, ...)`).
      entropy: optional f32 `[B, T]` (next_token_entropy), logged only.

    Returns:
      (loss, metrics): metrics are `clip_fraction` (region), `clip_fraction/low`,
      `clip_fraction/high`, `ratio/mean`, `ratio/max`, plus `clip_fraction/dual`, `kl`
      (masked token mean of the unclamped estimate), `is_weight/mean`, `engine_logp_gap`
      (masked mean |olp - elp|) and `entropy` when they apply.
    """
    _check_shapes(logps, old_logps, advantages, mask, ref_logps, engine_logps)
    if cfg.beta != 0 and ref_logps is None:
        raise ValueError(f"beta={cfg.beta} needs ref_logps")
    if cfg.tis_cap is not None and engine_logps is None:
        raise ValueError("tis_cap needs engine_logps")
    keep = mask.astype(bool)  # [B, T]

    def clean(x):
        # Zero the padding before any exp: garbage there would become NaN in the gradient
        # (0 * exp(inf)) even though the value is masked out.
        return jnp.where(keep, x.astype(jnp.float32), 0.0)

    lp, olp = clean(logps), clean(jax.lax.stop_gradient(old_logps))  # [B, T]
    adv = advantages.astype(jnp.float32)
    adv = adv[:, None] if adv.ndim == 1 else clean(adv)  # [B, 1] or [B, T]

    log_ratio = lp - olp  # [B, T]
    if cfg.importance_sampling_level == "sequence":
        log_ratio = masked_mean(log_ratio, keep, axis=-1)[:, None]  # [B, 1]
    if cfg.log_ratio_clamp is not None:
        log_ratio = jnp.clip(log_ratio, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)  # [B, T] or [B, 1]

    coef2 = jnp.clip(ratio, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)
    coef1 = ratio if cfg.delta is None else jnp.minimum(ratio, cfg.delta)
    pg = -jnp.minimum(coef1 * adv, coef2 * adv)  # [B, T] or [B, 1]
    metrics = {}
    if cfg.dual_clip is not None:
        floor = -cfg.dual_clip * adv  # the loss of a negative-advantage token never exceeds this
        dual_active = (adv < 0) & (pg > floor)
        pg = jnp.where(adv < 0, jnp.minimum(pg, floor), pg)
        metrics["clip_fraction/dual"] = _batch_mean(dual_active, keep)
    per_token = jnp.broadcast_to(pg, lp.shape)  # [B, T]

    if cfg.tis_cap is not None:
        elp = clean(jax.lax.stop_gradient(engine_logps))
        is_weight = jnp.minimum(jnp.exp(olp - elp), cfg.tis_cap)  # [B, T]
        per_token = per_token * is_weight
        metrics["is_weight/mean"] = masked_mean(is_weight, keep)
    if engine_logps is not None:
        gap = jnp.abs(olp - clean(engine_logps))
        metrics["engine_logp_gap"] = masked_mean(jax.lax.stop_gradient(gap), keep)

    if ref_logps is not None:
        rlp = clean(jax.lax.stop_gradient(ref_logps))
        if cfg.beta != 0:
            kl = kl_estimate(
                lp,
                rlp,
                cfg.kl_estimator,
                cfg.kl_clamp,
                log_ratio_clamp=cfg.log_ratio_clamp,
            )
            per_token = per_token + cfg.beta * kl
        raw_kl = kl_estimate(jax.lax.stop_gradient(lp), rlp, cfg.kl_estimator)
        metrics["kl"] = masked_mean(raw_kl, keep)

    loss = aggregate(
        per_token,
        keep,
        cfg.loss_agg,
        normalizer=normalizer,
        max_completion_length=cfg.max_completion_length,
    )

    # Clip statistics as TRL logs them: on coef1 (after delta), only where clipping bites.
    coef1, adv = jax.lax.stop_gradient(coef1), jax.lax.stop_gradient(adv)
    is_low = (coef1 < 1.0 - cfg.epsilon_low) & (adv < 0)
    is_high = (coef1 > 1.0 + cfg.epsilon_high) & (adv > 0)
    ratio = jax.lax.stop_gradient(ratio)
    metrics["clip_fraction/low"] = _batch_mean(is_low, keep)
    metrics["clip_fraction/high"] = _batch_mean(is_high, keep)
    metrics["clip_fraction"] = _batch_mean(is_low | is_high, keep)
    metrics["ratio/mean"] = _batch_mean(ratio, keep)
    metrics["ratio/max"] = _batch_max(ratio, keep)
    if entropy is not None:
        metrics["entropy"] = masked_mean(jax.lax.stop_gradient(entropy), keep)
    return loss, metrics


# TRL GRPOConfig defaults (trl/trainer/grpo_config.py): beta=0.0, epsilon=0.2,
# epsilon_high=None -> epsilon, loss_type="dapo", importance_sampling_level="token",
# delta=None, no log-ratio clamp; its KL term is k3 (unclamped).
TRL_GRPO = PolicyLossConfig(
    epsilon_low=0.2, epsilon_high=0.2, loss_agg="dapo", beta=0.0, kl_estimator="k3"
)
# DeepSeekMath (arXiv 2402.03300): per-sequence token mean, k3 KL with beta 0.04, eps 0.2.
DEEPSEEKMATH_GRPO = PolicyLossConfig(
    epsilon_low=0.2, epsilon_high=0.2, loss_agg="grpo", beta=0.04, kl_estimator="k3"
)
# DAPO (arXiv 2503.14476): clip-higher 0.2/0.28, global token mean, no KL.
DAPO = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.28, loss_agg="dapo", beta=0.0)
# Dr.GRPO (arXiv 2503.20783): constant B * L denominator, no KL. Set max_completion_length:
# dataclasses.replace(DR_GRPO, max_completion_length=L).
DR_GRPO = PolicyLossConfig(epsilon_low=0.2, epsilon_high=0.2, loss_agg="dr_grpo", beta=0.0)
