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

from tandem.align.algo_configs import DPOConfig, PPOConfig
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


# First: it needs no quickstart run, so it runs while that one finishes (tests/conftest.py).
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


@pytest.fixture(scope="module")
def arithmetic(quickstart_run):
    """An SFT'd tiny model (its HF directory), the task file, held-out problems and the
    model's reward on them. The SFT run, and the GRPO run from it, are the README
    quickstart's (tests/conftest.py runs it once for tests/cli too): SFT 100 steps of 32
    on 2000 problems, GRPO 30 steps of 128 completions in groups of 8 (align/quickstart.py)."""
    run_dir, _ = quickstart_run
    held_out = synthetic_arithmetic(128, seed=1)
    model_dir = str(run_dir / "sft" / "hf")
    _, reward = evaluate(model_dir, held_out, num_samples=8)
    return {
        "dir": run_dir,
        "model": model_dir,
        "train_file": str(run_dir / "arithmetic.jsonl"),
        "held_out": held_out,
        "reward": reward,
    }


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


def test_grpo_raises_the_reward_of_an_sfted_model(arithmetic):
    _, reward = evaluate(
        str(arithmetic["dir"] / "grpo" / "hf"), arithmetic["held_out"], num_samples=8
    )
    print(f"GRPO: held-out mean reward {arithmetic['reward']:.3f} -> {reward:.3f}")
    assert reward > arithmetic["reward"] + 0.05


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
