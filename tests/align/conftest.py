"""Shared by the learning tests (test_learning.py, test_learning_ppo.py)."""

from __future__ import annotations

import gin
import pytest

from tandem.align.data import synthetic_arithmetic
from tandem.align.quickstart import MODEL_BINDINGS, evaluate
from tandem.configs import parse


@pytest.fixture
def tiny_model_config():
    gin.clear_config()
    parse(["models/tiny.gin"], MODEL_BINDINGS)
    yield
    gin.clear_config()


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
