"""Reward models: a transformer trunk and a scalar head, trained with the Bradley-Terry loss.

The reward of a sequence is `score . norm(h_last)`, h_last being the trunk's output at the
last completion token (the EOS), as in HF's `*ForSequenceClassification` with one label.
The trunk drops the LM head (an unused head would never be trained).

On disk a reward model is what TRL's RewardTrainer writes: a `*ForSequenceClassification`
checkpoint with `num_labels = 1`, the trunk under HF's `model.*` names plus `score.weight`
[1, D], and `pad_token_id` set so that transformers pools the last non-pad token. It loads in
`transformers.AutoModelForSequenceClassification` and scores the same. `load_reward_model`
also reads such checkpoints written by transformers, and the layout tandem wrote before (a
tied causal LM plus `score.safetensors`). `RewardModelScorer` makes a saved model a reward
function for RL. Training one is reward_trainer.py's; this module imports nothing of the
training stack, so RL can score with a reward model without it.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.model.config import ModelConfig, to_hf_config
from tandem.model.hf import (
    SCORE_WEIGHT,
    SINGLE_FILE,
    load_trunk,
    read_hf_config,
    tensor_files,
    weight_table,
)
from tandem.model.safetensors_io import CheckpointError, read_safetensors, write_safetensors
from tandem.model.transformer import Transformer
from tandem.serve.buckets import power_of_two_at_least

SCORE_FILE = "score.safetensors"  # the head in tandem's earlier layout: {"score": [D]}
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
}


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


# --- Hugging Face sequence-classification checkpoints --------------------------------------


def seq_cls_config(cfg: ModelConfig, *, pad_token_id: int | None, dtype) -> dict:
    """The config.json of a one-label `*ForSequenceClassification` with `cfg`'s trunk."""
    hf = to_hf_config(cfg)
    hf.update(
        architectures=[ARCHITECTURES[cfg.model_type]],
        # transformers counts labels from id2label; num_labels is written for readers.
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        # transformers scores the last token that is not padding (its only way to find it).
        pad_token_id=pad_token_id,
        torch_dtype=str(jnp.dtype(dtype)),
    )
    return hf


def save_reward_model(model: RewardModel, tokenizer, out_dir: str) -> None:
    """Writes `model` as a one-label HF sequence classifier (one safetensors file) with its
    tokenizer; `pad_token_id` is the tokenizer's pad (its EOS without one, as TRL does)."""
    trunk = model.trunk
    table = weight_table(trunk.config)
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(trunk, nnx.Param)):
        hf_name, _, to_hf = table[path]
        tensors[hf_name] = to_hf(np.asarray(jax.device_get(variable[...])))
    tensors[SCORE_WEIGHT] = np.asarray(jax.device_get(model.score[...]))[None, :]  # [1, D]
    os.makedirs(out_dir, exist_ok=True)
    # A head left by the earlier layout would contradict the one written now.
    if os.path.isfile(os.path.join(out_dir, SCORE_FILE)):
        os.remove(os.path.join(out_dir, SCORE_FILE))
    write_safetensors(os.path.join(out_dir, SINGLE_FILE), tensors)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf = seq_cls_config(trunk.config, pad_token_id=pad, dtype=trunk.embed[...].dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    tokenizer.save_pretrained(out_dir)


def load_reward_model(model_dir: str, *, dtype=jnp.float32) -> RewardModel:
    """A reward model from an HF one-label sequence-classification checkpoint (written by
    tandem or by transformers/TRL) or from tandem's earlier layout (causal LM +
    score.safetensors). Errors name the file and the key that is wrong."""
    hf = read_hf_config(model_dir)  # a missing directory or config.json fails here, named
    architectures = hf.get("architectures") or []
    is_causal_lm = not any(a.endswith("ForSequenceClassification") for a in architectures)
    if is_causal_lm and os.path.isfile(os.path.join(model_dir, SCORE_FILE)):
        return _load_causal_lm_layout(model_dir, dtype)
    # Named before the trunk is read, so a causal LM fails fast.
    if SCORE_WEIGHT not in tensor_files(model_dir):
        raise CheckpointError(
            f"{model_dir}: tensor {SCORE_WEIGHT!r} is missing, so this is not a reward model "
            f"(expected a *ForSequenceClassification checkpoint with num_labels = 1)"
        )
    # transformers' rule: id2label decides, then num_labels, then its default of 2.
    num_labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    if num_labels != 1:
        raise CheckpointError(
            f"{os.path.join(model_dir, 'config.json')}: num_labels is {num_labels}; a reward "
            f"model has one label (its score)"
        )
    trunk, unused = load_trunk(model_dir, dtype=dtype)
    score, score_file = unused.pop(SCORE_WEIGHT)
    dim = trunk.config.hidden_size
    if score.shape != (1, dim):
        raise CheckpointError(
            f"{score_file}: tensor {SCORE_WEIGHT!r} has shape {tuple(score.shape)}, expected "
            f"[1, hidden_size] = [1, {dim}]"
        )
    return _with_score(model_dir, trunk, unused, score[0], dtype)


def _load_causal_lm_layout(model_dir: str, dtype) -> RewardModel:
    """tandem's earlier layout: the trunk as a tied causal LM, the head in SCORE_FILE."""
    path = os.path.join(model_dir, SCORE_FILE)
    trunk, unused = load_trunk(model_dir, dtype=dtype)
    score = read_safetensors(path).get("score")
    if score is None or score.shape != (trunk.config.hidden_size,):
        raise CheckpointError(f"{path}: expected a 'score' tensor of shape [hidden_size]")
    return _with_score(model_dir, trunk, unused, score, dtype)


def _with_score(model_dir: str, trunk: Transformer, unused: dict, score, dtype) -> RewardModel:
    """The reward model of `trunk` and `score` [D]; no other tensor may be left unused."""
    if unused:
        raise CheckpointError(
            f"{model_dir}: tensors a reward model has no place for: {sorted(unused)[:5]}"
        )
    model = RewardModel(trunk, rngs=nnx.Rngs(0))
    model.score[...] = jnp.asarray(score, dtype)
    return model


class RewardModelScorer:
    """A reward function (TRL's signature) backed by a reward model: scores prompt+completion
    at its last token, as transformers pools a right-padded batch."""

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
        # Widths are powers of two (at least 8), so few distinct shapes compile.
        width = power_of_two_at_least(max(len(x) for x in ids), 8)
        # Right padding is never attended (the mask is causal) and never scored.
        tokens = np.zeros((len(ids), width), np.int32)  # [B, T]
        for i, row in enumerate(ids):
            tokens[i, : len(row)] = row
        last = np.array([len(row) - 1 for row in ids], np.int32)  # [B]
        return np.asarray(self._score(self._state, tokens, last)).tolist()
