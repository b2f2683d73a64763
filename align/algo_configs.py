"""The schema of every training algorithm's knobs: frozen dataclasses that gin binds.

`TrainConfig` (train_config.py) holds what every run shares; these hold what one algorithm
adds. They live together, away from the trainers, so that parsing a gin file never imports
the training stack.
"""

from __future__ import annotations

import dataclasses

import gin

from tandem.align.losses.policy_gradient import DAPO, DEEPSEEKMATH_GRPO, DR_GRPO, TRL_GRPO

NEEDS_REFERENCE = {"dpo": True, "simpo": False, "orpo": False}


PRESETS = {
    "trl": TRL_GRPO,
    "deepseekmath": DEEPSEEKMATH_GRPO,
    "dapo": DAPO,
    "dr_grpo": DR_GRPO,
}
LOSS_OVERRIDES = (
    "epsilon_low",
    "epsilon_high",
    "beta",
    "loss_agg",
    "kl_estimator",
    "kl_clamp",
    "importance_sampling_level",
    "dual_clip",
    "delta",
    "log_ratio_clamp",
    "tis_cap",
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SFTConfig:
    packing: bool = False
    """Pack several examples into each row of max_length tokens (segment ids keep them apart)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPOConfig:
    loss: str = "dpo"
    """dpo (with a frozen reference), simpo or orpo (no reference)."""
    loss_type: str = "sigmoid"
    """For loss=dpo: sigmoid, ipo, hinge or robust."""
    beta: float = 0.1
    """TRL's default."""
    label_smoothing: float = 0.0
    """Label-smoothing epsilon in [0, 0.5): cDPO / robust DPO for loss=dpo (loss_type sigmoid
    or robust), and the same smoothing of SimPO's sigmoid for loss=simpo, as TRL's
    CPOTrainer applies it. ORPO does not use it."""
    simpo_gamma: float = 0.5
    """SimPO's target margin gamma (TRL's default)."""

    def __post_init__(self):
        if self.loss not in NEEDS_REFERENCE:
            raise ValueError(
                f"DPOConfig.loss must be one of {sorted(NEEDS_REFERENCE)}, got {self.loss!r}"
            )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardConfig:
    center_rewards_coefficient: float | None = None
    """TRL's auxiliary loss c * mean((r_w + r_l)^2) that keeps rewards centred at 0."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    group_size: int = 8
    """Completions per prompt (TRL's num_generations). TrainConfig.batch_size counts
    completions, so it must be a multiple."""
    max_prompt_length: int = 256
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    reward_funcs: tuple[str, ...] = ()
    """Registry names (exact_match, math_answer, think_format, ...) or 'module:function'."""
    reward_weights: tuple[float, ...] | None = None
    reward_model: str | None = None
    """A saved tandem reward model directory, scored after the functions."""
    loss_preset: str = "trl"
    """trl, deepseekmath, dapo or dr_grpo: the loss's defaults; fields below override."""
    advantage: str = "grpo"
    """grpo (group-normalised), dr_grpo (mean only) or rloo."""
    scale_rewards: str = "group"
    """For advantage=grpo: group, batch or none."""
    advantage_epsilon: float = 1e-4
    """TRL's 1e-4; Tunix/veRL 1e-6, OpenRLHF 1e-9."""
    num_iterations: int = 1
    """Updates per rollout batch (TRL's mu)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and draw more prompts."""
    max_sampling_tries: int = 4
    overlong_cache_length: int | None = None
    """DAPO soft overlong punishment over the last L_cache tokens of max_completion_length."""
    epsilon_low: float | None = None
    epsilon_high: float | None = None
    beta: float | None = None
    loss_agg: str | None = None
    kl_estimator: str | None = None
    kl_clamp: float | None = None
    importance_sampling_level: str | None = None
    dual_clip: float | None = None
    delta: float | None = None
    log_ratio_clamp: float | None = None
    tis_cap: float | None = None

    def __post_init__(self):
        if self.loss_preset not in PRESETS:
            raise ValueError(
                f"GRPOConfig.loss_preset must be one of {sorted(PRESETS)}, got {self.loss_preset!r}"
            )
        if self.group_size < 1:
            raise ValueError(f"GRPOConfig.group_size must be >= 1, got {self.group_size}")

    def loss_config(self):
        overrides = {k: getattr(self, k) for k in LOSS_OVERRIDES if getattr(self, k) is not None}
        preset = PRESETS[self.loss_preset]
        return dataclasses.replace(
            preset, max_completion_length=self.max_completion_length, **overrides
        )


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    group_size: int = 1
    """Completions per prompt."""
    max_prompt_length: int = 256
    max_completion_length: int = 53
    """TRL's response_length."""
    temperature: float = 0.7
    """TRL's default; logprobs are recomputed at the same temperature."""
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    reward_model: str | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a completion that never emitted EOS."""
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
