"""Alignment losses: the front door to the loss registry.

Every loss is a pure, jit-able function returning `(loss, metrics)`: `loss` an f32 scalar,
`metrics` a flat dict of f32 scalars. Per-token inputs are `[B, T]` and aligned with their
mask (see align/logprobs.py). Trainers know only the registry key:

    loss_fn = get_loss("grpo")
    n = loss_denominator(batch_mask, cfg.loss_agg, max_completion_length=L)   # once per batch
    loss, metrics = loss_fn(logps, old_logps, adv, mask, cfg=cfg, normalizer=n)  # per micro

Gradient accumulation contract: each loss takes `normalizer`. None divides by the loss's own
local denominator; a whole-batch denominator from `loss_denominator` makes the micro-batch
losses and gradients sum to the full-batch ones (aggregation.py has the table).

| key           | function (module in this package)      | normalizer (loss_denominator agg)    |
|---------------|----------------------------------------|--------------------------------------|
| grpo          | policy_gradient.policy_gradient_loss   | cfg.loss_agg                         |
| ppo_policy    | ppo.ppo_policy_loss                    | token_mean                           |
| ppo_value     | ppo.ppo_value_loss                     | token_mean                           |
| dpo           | preference.dpo_loss                    | seq_mean (pairs)                     |
| simpo         | preference.simpo_loss                  | seq_mean (pairs)                     |
| orpo          | preference.orpo_loss                   | seq_mean + nll_normalizer token_mean |
| bradley_terry | preference.bradley_terry_loss          | seq_mean (pairs)                     |
| sft           | sft.sft_loss                           | token_mean                           |
"""

from __future__ import annotations

from collections.abc import Callable

from tandem.align import registry
from tandem.align.losses.aggregation import AGGREGATIONS, aggregate, loss_denominator
from tandem.align.losses.kl import KL_ESTIMATORS, kl_estimate
from tandem.align.losses.policy_gradient import (
    DAPO,
    DEEPSEEKMATH_GRPO,
    DR_GRPO,
    TRL_GRPO,
    PolicyLossConfig,
    policy_gradient_loss,
)
from tandem.align.losses.ppo import ppo_policy_loss, ppo_value_loss
from tandem.align.losses.preference import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from tandem.align.losses.sft import sft_loss


def get_loss(name: str) -> Callable:
    """The registered loss `name`; a ValueError lists the known names otherwise."""
    return registry.get("loss", name)


__all__ = [
    "AGGREGATIONS",
    "DAPO",
    "DEEPSEEKMATH_GRPO",
    "DPO_LOSS_TYPES",
    "DR_GRPO",
    "KL_ESTIMATORS",
    "TRL_GRPO",
    "PolicyLossConfig",
    "aggregate",
    "bradley_terry_loss",
    "dpo_loss",
    "get_loss",
    "kl_estimate",
    "loss_denominator",
    "orpo_loss",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
    "simpo_loss",
]
