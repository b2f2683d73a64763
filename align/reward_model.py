"""Reward models: a transformer trunk and a scalar head, trained with the Bradley-Terry loss.

The reward of a sequence is `score . norm(h_last)`, h_last being the trunk's output at the
last completion token (the EOS), as in HF's `*ForSequenceClassification` with one label.
The trunk drops the LM head (an unused head would never be trained). `save_reward_model`
writes the trunk in HF format (as a tied-embedding causal LM, so tandem's loader reads it)
plus `score.safetensors`; `RewardModelScorer` makes a saved model a reward function for RL.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.align.algo_configs import RewardConfig
from tandem.align.dpo import pair_rows, preference_batches
from tandem.align.losses import get_loss
from tandem.align.policy import load_policy
from tandem.align.train_config import TrainConfig
from tandem.align.trainer import RunResult, build_mesh, fit
from tandem.model.transformer import Transformer

SCORE_FILE = "score.safetensors"


class RewardModel(nnx.Module):
    def __init__(self, trunk: Transformer, *, rngs: nnx.Rngs):
        trunk.lm_head = None
        trunk.config = dataclasses.replace(trunk.config, tie_word_embeddings=True)
        self.trunk = trunk
        dim = trunk.config.hidden_size
        # Small init (HF's initializer_range is 0.02) so rewards start near 0.
        self.score = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (dim,), trunk.embed.dtype),
            logical_axes=("embed",),
        )

    def __call__(
        self,
        tokens: jax.Array,  # i32[B, T]
        last_index: jax.Array,  # i32[B] position of the token whose state is scored
    ) -> jax.Array:  # f32[B]
        h = self.trunk.norm(self.trunk.features(tokens))  # [B, T, D]
        h_last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)[:, 0]  # [B, D]
        return jnp.einsum("bd,d->b", h_last, self.score[...], preferred_element_type=jnp.float32)


def last_index(mask: jax.Array) -> jax.Array:  # f32[B, T] -> i32[B]
    """The last position where the mask is set (the EOS of the completion)."""
    positions = jnp.arange(mask.shape[1])[None, :]
    return jnp.max(jnp.where(mask > 0, positions, 0), axis=-1).astype(jnp.int32)


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


def save_reward_model(model: RewardModel, tokenizer, out_dir: str) -> None:
    from safetensors.numpy import save_file

    from tandem.model.hf import save_model

    save_model(model.trunk, out_dir)
    save_file(
        {"score": np.asarray(jax.device_get(model.score[...]))}, os.path.join(out_dir, SCORE_FILE)
    )
    tokenizer.save_pretrained(out_dir)


def load_reward_model(model_dir: str, *, dtype=jnp.float32) -> RewardModel:
    from safetensors.numpy import load_file

    from tandem.model.hf import load_model
    from tandem.model.safetensors_io import CheckpointError

    path = os.path.join(model_dir, SCORE_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; {model_dir} is not a tandem reward model")
    model = RewardModel(load_model(model_dir, dtype=dtype), rngs=nnx.Rngs(0))
    score = load_file(path).get("score")
    if score is None or score.shape != (model.trunk.config.hidden_size,):
        raise CheckpointError(f"{path}: expected a 'score' tensor of shape [hidden_size]")
    model.score[...] = jnp.asarray(score, dtype)
    return model


class RewardModelScorer:
    """A reward function (TRL's signature) backed by a reward model: scores prompt+completion
    at its last token."""

    def __init__(self, model: RewardModel, tokenizer, *, max_length: int = 1024):
        self.tokenizer = tokenizer
        self.max_length = max_length
        graphdef, state = nnx.split(model)
        self._state = state
        self._score = jax.jit(lambda s, t, i: nnx.merge(graphdef, s)(t, i))
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, **columns):
        ids = [
            self.tokenizer.encode(p + c, add_special_tokens=False)[-self.max_length :]
            for p, c in zip(prompts, completions)
        ]
        width = max(8, 1 << (max(len(x) for x in ids) - 1).bit_length())
        tokens = np.zeros((len(ids), width), np.int32)
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = row
        last = np.array([len(row) - 1 for row in ids], np.int32)
        return np.asarray(self._score(self._state, tokens, last)).tolist()


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
