"""Learning on CPU, as a user would check it: DPO learns a preference, and GRPO and PPO
raise the reward of an SFT'd tiny model on arithmetic above where it started.

Every run is seeded, so these are deterministic on one machine; the margins asked for are
several standard errors of the held-out estimate (1024 samples: about 0.015)."""

from __future__ import annotations

import json

import gin
import jax
import numpy as np
import pytest

from tandem.align.algo_configs import DPOConfig, GRPOConfig, PPOConfig, SFTConfig
from tandem.align.data import synthetic_arithmetic, synthetic_preferences
from tandem.align.quickstart import MODEL_BINDINGS, evaluate
from tandem.align.train_config import TrainConfig
from tandem.configs import parse

pytestmark = pytest.mark.slow


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(autouse=True)
def tiny_model_config():
    gin.clear_config()
    parse(["models/tiny.gin"], MODEL_BINDINGS)
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory):
    """An SFT'd tiny model (its HF directory), the task file and held-out problems."""
    from tandem.align.sft import train_sft

    gin.clear_config()
    parse(["models/tiny.gin"], MODEL_BINDINGS)
    d = tmp_path_factory.mktemp("arith")
    train_file = write_jsonl(d / "arith.jsonl", synthetic_arithmetic(2000, seed=0))
    train_sft(
        TrainConfig(
            run_dir=str(d / "sft"),
            train_file=train_file,
            num_steps=100,
            batch_size=32,
            max_length=16,
            learning_rate=3e-3,
            warmup_steps=10,
            progress=False,
        ),
        SFTConfig(),
    )
    held_out = synthetic_arithmetic(128, seed=1)
    model_dir = str(d / "sft" / "hf")
    _, reward = evaluate(model_dir, held_out, num_samples=8)
    return {
        "dir": d,
        "model": model_dir,
        "train_file": train_file,
        "held_out": held_out,
        "reward": reward,
    }


def rl_config(arithmetic, name, **kw) -> TrainConfig:
    base = dict(
        run_dir=str(arithmetic["dir"] / name),
        model=arithmetic["model"],
        train_file=arithmetic["train_file"],
        max_length=16,
        learning_rate=1e-3,
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def test_grpo_raises_the_reward_of_an_sfted_model(arithmetic):
    from tandem.align.grpo import train_grpo

    cfg = rl_config(arithmetic, "grpo", num_steps=30, batch_size=128)
    train_grpo(
        cfg,
        GRPOConfig(
            group_size=8,
            max_prompt_length=8,
            max_completion_length=4,
            reward_funcs=("exact_match",),
        ),
    )
    _, reward = evaluate(f"{cfg.run_dir}/hf", arithmetic["held_out"], num_samples=8)
    print(f"GRPO: held-out mean reward {arithmetic['reward']:.3f} -> {reward:.3f}")
    assert reward > arithmetic["reward"] + 0.05


def test_ppo_raises_the_reward_of_an_sfted_model(arithmetic):
    from tandem.align.ppo import train_ppo

    cfg = rl_config(arithmetic, "ppo", num_steps=30, batch_size=64)
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


def test_dpo_learns_the_preference(tmp_path):
    """Held-out pairs: the trained policy's implicit reward beta*log(pi/pi_ref) ranks the
    chosen completion above the rejected one for more than 90% of them."""
    from tandem.align import data
    from tandem.align.dpo import DPO, train_dpo
    from tandem.align.policy import load_policy

    records = synthetic_preferences(512, seed=0)
    cfg = TrainConfig(
        run_dir=str(tmp_path / "dpo"),
        train_file=write_jsonl(tmp_path / "prefs.jsonl", records),
        num_steps=40,
        batch_size=16,
        max_length=16,
        learning_rate=1e-3,
        progress=False,
    )
    result = train_dpo(cfg, DPOConfig())
    reference, tokenizer = load_policy(cfg)  # the same seed: the starting weights
    held_out = synthetic_preferences(128, seed=1)
    examples = [data.tokenize_preference(r, tokenizer, cfg.max_length) for r in held_out]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    algo = DPO(DPOConfig(), reference)
    batch, _ = algo.prepare(None, iter([batch]), 0)
    _, metrics = algo.loss(
        result.module, jax.tree.map(jax.numpy.asarray, batch), len(held_out), None
    )
    accuracy = float(metrics["rewards/accuracy"])
    print(f"DPO: held-out preference accuracy {accuracy:.3f}")
    assert accuracy > 0.9
