"""The one registry of named functions (losses, advantages, rewards), and the import rules that
keep align's sub-packages apart."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from tandem.align import registry
from tandem.align.losses import dpo_loss, get_loss
from tandem.align.rl import rewards
from tandem.align.rl.advantages import get_advantage


def test_every_category_is_filled_by_its_front_door():
    assert {"grpo", "dpo", "sft", "bradley_terry"} <= set(registry.names("loss"))
    assert registry.names("advantage") == ["dr_grpo", "grpo", "rloo"]
    assert {"exact_match", "math_answer", "think_format"} <= set(registry.names("reward"))
    assert registry.names("reward_factory") == ["regex_format"]
    assert registry.get("loss", "dpo") is get_loss("dpo") is dpo_loss
    assert registry.get("reward", "exact_match") is rewards.exact_match


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown advantage 'gae'; known advantages: \['dr_grpo'"):
        registry.get("advantage", "gae")
    with pytest.raises(ValueError, match=r"unknown reward_factory 'x'; known reward factories"):
        registry.get("reward_factory", "x")
    with pytest.raises(
        ValueError, match=r"unknown registry category 'losses'; known: \['advantage'"
    ):
        registry.names("losses")
    with pytest.raises(ValueError, match="unknown registry category"):
        registry.register("metric", "x")


def test_a_taken_name_is_refused_unless_it_is_the_same_function():
    assert registry.register("loss", "dpo")(dpo_loss) is dpo_loss  # a module reloaded
    with pytest.raises(ValueError, match="loss 'dpo' is already registered"):
        registry.register("loss", "dpo")(lambda *a, **k: None)


def test_every_advantage_estimator_takes_the_same_call():
    # Two groups of 4: [0, 1, 0, 1] and [1, 1, 1, 1] (all equal: every estimator gives 0).
    rewards_b = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    for name in registry.names("advantage"):
        advantages = get_advantage(name)(rewards_b, 4, scale="group", epsilon=1e-4)
        assert advantages.shape == (8,), name
        np.testing.assert_allclose(np.asarray(advantages)[4:], 0.0, err_msg=name)
        # Each group's advantages sum to 0 and rank the right answers above the wrong ones.
        np.testing.assert_allclose(np.asarray(advantages)[:4].sum(), 0.0, atol=1e-6)
        assert advantages[1] > 0 > advantages[0], name


def test_sub_packages_import_only_what_they_use():
    """The reward model (what RL scores with) imports no trainer; the reward trainer gets its
    preference data from align/data, not from the DPO trainer; what PPO and GRPO share imports
    no trainer; the registry imports no jax."""
    code = (
        "import sys\n"
        "def loaded(module):\n"
        "    before = set(sys.modules)\n"
        "    __import__(module)\n"
        "    return set(sys.modules) - before\n"
        "new = loaded('tandem.align.registry')\n"
        "assert not any(m == 'jax' or m.startswith('jax.') for m in new), new\n"
        "new = loaded('tandem.align.reward_model')\n"
        "assert not {'tandem.align.trainer', 'tandem.align.dpo'} & new, new\n"
        "new = loaded('tandem.align.rl.common')\n"
        "assert not {'tandem.align.trainer', 'tandem.align.reward_trainer'} & new, new\n"
        "new = loaded('tandem.align.reward_trainer')\n"
        "assert 'tandem.align.data.preference' in new and 'tandem.align.dpo' not in new, new\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
