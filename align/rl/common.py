"""What PPO and GRPO share: the rollout engine, prompt data, rewards, logprob passes.

The engine serves the very arrays the trainer updates: it is built on the policy module, and
after each optimizer step `Engine.update_params` installs the new ones by reference. On a mesh the
engine runs on the trainer's mesh, so rollouts run tensor parallel on the same sharded arrays.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np
from flax import nnx

from tandem.align import data
from tandem.align.logprobs import next_token_logprobs
from tandem.align.reward_model import RewardModelScorer, load_reward_model
from tandem.align.rl.rewards import combine_rewards, resolve_reward
from tandem.align.rl.rollout import Rollouts
from tandem.align.train_config import TrainConfig
from tandem.model.sharding import mesh_context
from tandem.serve.buckets import power_of_two_at_least
from tandem.serve.engine import Engine, EngineConfig

PROMPT_KEYS = ("prompt", "prompt_ids")


def make_engine(
    model,
    tokenizer,
    *,
    num_seqs: int,
    max_len: int,
    page_size: int = 16,
    seed: int = 0,
    mesh=None,
) -> Engine:
    """An engine with pages for `num_seqs` sequences of `max_len` tokens (no memory probing:
    RL sizes its own batch), on `mesh` when the policy trains on one."""
    pages_per_seq = math.ceil(max_len / page_size) + 1
    config = EngineConfig(
        page_size=page_size,
        num_pages=num_seqs * pages_per_seq + 8,
        max_model_len=pages_per_seq * page_size,
        max_num_seqs=num_seqs,
        # Every running sequence decodes one token per step, so the budget holds them all.
        max_num_batched_tokens=max(num_seqs, power_of_two_at_least(max_len, 256)),
        enable_prefix_caching=True,
        seed=seed,
    )
    return Engine(model, tokenizer, config, mesh=mesh)


def prompt_iterator(cfg: TrainConfig, tokenizer, *, num_prompts: int, max_prompt_length: int):
    """A checkpointable grain iterator of lists of `num_prompts` prompt records."""
    records = data.read_records(cfg.train_file)
    dataset = data.make_dataset(
        records,
        functools.partial(
            data.tokenize_prompt, tokenizer=tokenizer, max_prompt_length=max_prompt_length
        ),
        batch_size=num_prompts,
        seed=cfg.seed,
    )
    return iter(dataset)


def reward_functions(algo_cfg, tokenizer) -> list:
    """The rewards a GRPO or PPO config names: its `reward_funcs`, then its `reward_model`
    scoring prompt + completion (at most max_prompt_length + max_completion_length)."""
    fns = [resolve_reward(n) for n in algo_cfg.reward_funcs]
    if algo_cfg.reward_model:
        max_length = algo_cfg.max_prompt_length + algo_cfg.max_completion_length
        model = load_reward_model(algo_cfg.reward_model)
        fns.append(RewardModelScorer(model, tokenizer, max_length=max_length))
    if not fns:
        raise ValueError("no reward: set `reward_funcs` and/or `reward_model` in the config")
    return fns


def score(
    rollouts: Rollouts, rows: list[dict], tokenizer, fns, weights
) -> tuple[np.ndarray, dict[str, float]]:
    """Rewards f32[N] of the completions, `rows[i]` being completion i's prompt record (its
    other columns, e.g. `answer`, go to the reward functions); NaN where no function
    applies. Metrics: each function's mean."""
    prompts = [r["prompt"] if "prompt" in r else tokenizer.decode(r["prompt_ids"]) for r in rows]
    completions = [tokenizer.decode(c, skip_special_tokens=True) for c in rollouts.completion_ids]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k not in PROMPT_KEYS} if rows else {}
    total, per_fn = combine_rewards(fns, weights, prompts, completions, columns)
    metrics = {f"rewards/{name}": float(np.nanmean(v)) for name, v in per_fn.items()}
    return np.asarray(total, np.float32), metrics


def on_mesh(fn, mesh):
    """`fn` called under `mesh_context(mesh)` (the activation layout the train step uses);
    `fn` itself without a mesh."""
    if mesh is None:
        return fn

    def call(*args):
        with mesh_context(mesh):
            return fn(*args)

    return call


def make_logps_fn(graphdef, temperature: float, mesh=None):
    """jit(params, tokens i32[B, T]) -> f32[B, T] next-token logprobs at `temperature`, run
    on `mesh` when given."""

    def logps(params, tokens):
        return next_token_logprobs(nnx.merge(graphdef, params)(tokens), tokens, temperature)

    return on_mesh(jax.jit(logps), mesh)


def timed(fn, *args):
    """(fn(*args) fetched to host, seconds)."""
    t0 = time.perf_counter()
    out = jax.device_get(fn(*args))
    return out, time.perf_counter() - t0


def rollout_metrics(rollouts: Rollouts, batch: dict, rewards: np.ndarray, logps: np.ndarray):
    """Reward, length and |logp_engine - logp_trainer| statistics of one rollout batch."""
    mask = batch["completion_mask"] > 0
    gap = np.abs(batch["engine_logps"] - logps)[mask]
    return {
        "reward/mean": float(np.nanmean(rewards)),
        "reward/std": float(np.nanstd(rewards)),
        "completion_length/mean": float(np.mean(batch["completion_lengths"])),
        "completion_length/max": float(np.max(batch["completion_lengths"])),
        "completions/eos_fraction": float(np.mean(batch["has_eos"])),
        "logp_mismatch/mean": float(gap.mean()) if gap.size else 0.0,
        "logp_mismatch/max": float(gap.max()) if gap.size else 0.0,
        "num_cached_tokens": float(rollouts.num_cached_tokens),
        "time/rollout": rollouts.seconds,
    }
