"""Learning on CPU, as a user would check it: DPO learns a preference, and GRPO raises the
reward of an SFT'd tiny model on arithmetic above where it started (PPO: test_learning_ppo.py,
a file of its own so that the two runs from the quickstart's model go to both test workers).

Every run is seeded, so these are deterministic on one machine; the margins asked for are
several standard errors of the held-out estimate (1024 samples: about 0.015)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from tandem.align.algo_configs import DPOConfig
from tandem.align.data import synthetic_preferences
from tandem.align.quickstart import evaluate
from tandem.align.train_config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tiny_model_config")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


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


def test_grpo_raises_the_reward_of_an_sfted_model(arithmetic):
    _, reward = evaluate(
        str(arithmetic["dir"] / "grpo" / "hf"), arithmetic["held_out"], num_samples=8
    )
    print(f"GRPO: held-out mean reward {arithmetic['reward']:.3f} -> {reward:.3f}")
    assert reward > arithmetic["reward"] + 0.05
