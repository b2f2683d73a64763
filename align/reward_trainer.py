"""Reward-model training: the Bradley-Terry loss on preference pairs (TRL's RewardTrainer).

Each batch holds pairs (`chosen_tokens`, `chosen_mask`, `rejected_tokens`, `rejected_mask`,
each [B, T]); both sides go through the model as one [2B, T] batch and are scored at their
last completion token. The model and its checkpoint format are reward_model.py's.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from tandem.align.algo_configs import RewardConfig
from tandem.align.data.preference import pair_rows, preference_batches
from tandem.align.losses import get_loss
from tandem.align.policy import load_policy
from tandem.align.reward_model import RewardModel, last_index, save_reward_model
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit


class RewardTrainer:
    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def loss(self, model, batch, normalizer, rng):
        del rng
        tokens, mask = pair_rows(batch)
        rewards = model(tokens, last_index(mask))  # [2B]
        num_pairs = batch["chosen_tokens"].shape[0]
        return get_loss("bradley_terry")(
            rewards[:num_pairs],
            rewards[num_pairs:],
            center_rewards_coefficient=self.cfg.center_rewards_coefficient,
            normalizer=normalizer,
        )

    def denominator(self, batch):
        return jnp.asarray(batch["chosen_tokens"].shape[0], jnp.float32)

    def prepare(self, state, data_iter, step):
        return next(data_iter), {}

    def after_update(self, state):
        return {}


def train_reward_model(cfg: TrainConfig, rm: RewardConfig | None = None) -> RunResult:
    mesh = build_mesh(cfg)
    trunk, tokenizer = load_policy(cfg, mesh)
    model = RewardModel(trunk, rngs=nnx.Rngs(cfg.seed))

    def export(model, run_dir):
        save_reward_model(model, tokenizer, os.path.join(run_dir, "hf"))

    return fit(
        cfg,
        model,
        RewardTrainer(rm or RewardConfig()),
        preference_batches(cfg, tokenizer),
        mesh=mesh,
        export=export,
    )
