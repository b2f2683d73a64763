"""Learning on CPU: PPO raises the reward of the quickstart's SFT'd tiny model on arithmetic
above where it started (the margin as in test_learning.py)."""

from __future__ import annotations

import pytest

from tandem.align.algo_configs import PPOConfig
from tandem.align.quickstart import evaluate
from tandem.align.train_config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_model_config")]


def rl_config(arithmetic, run_dir, **kw) -> TrainConfig:
    base = dict(
        run_dir=str(run_dir),
        model=arithmetic["model"],
        train_file=arithmetic["train_file"],
        max_length=16,
        learning_rate=1e-3,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def test_ppo_raises_the_reward_of_an_sfted_model(arithmetic, tmp_path):
    from tandem.align.rl.ppo import train_ppo

    cfg = rl_config(arithmetic, tmp_path / "ppo", num_steps=30, batch_size=64)
    train_ppo(
        cfg,
        PPOConfig(
            max_prompt_length=8,
            max_completion_length=4,
            temperature=1.0,
            reward_funcs=("exact_match",),
        ),
    )
    _, reward = evaluate(f"{cfg.run_dir}/hf", arithmetic["held_out"], num_samples=8)
    print(f"PPO: held-out mean reward {arithmetic['reward']:.3f} -> {reward:.3f}")
    assert reward > arithmetic["reward"] + 0.05
