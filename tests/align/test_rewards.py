"""Reward functions on hand-made cases; combining them with TRL's None/NaN semantics; names
resolved from the registry and from dotted paths (as gin files write them)."""

import math

import numpy as np
import pytest

from tandem.align.rl import rewards as R


def length_reward(prompts, completions, **_):
    """A user reward defined in this module, for resolve_reward's dotted paths."""
    return [float(len(c)) for c in completions]


class Scaled:
    """A user reward object (the shape of a reward-model scorer): built with kwargs."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def __call__(self, prompts, completions, **_):
        return [self.scale * len(c) for c in completions]


NOT_CALLABLE = 3


def test_exact_match_strips_whitespace_and_skips_rows_without_answer():
    out = R.exact_match(["p"] * 4, [" 42\n", "42 ", "41", "x"], answer=["42", " 42", "42", None])
    assert out == [1.0, 1.0, 0.0, None]
    with pytest.raises(ValueError, match="column 'answer'"):
        R.exact_match(["p"], ["42"])
    with pytest.raises(ValueError, match="1 rows for 2"):
        R.exact_match(["p", "q"], ["42", "1"], answer=["42"])


def test_regex_format_needs_a_full_match_across_lines():
    fn = R.regex_format(r"<answer>.*</answer>")
    completions = ["<answer>a\nb</answer>", "x <answer>a</answer>", "<answer>a</answer> x"]
    assert fn(["p"] * 3, completions) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="bad pattern"):
        R.regex_format("(unclosed")


def test_think_format():
    completions = [
        "<think>add 2 and 2</think> 4",
        "  <think>\nhm\n</think>\n\nThe answer is 4.\n",
        "<think>no answer</think>   ",
        "4 <think>late</think> 4",
        "<think>a</think><think>b</think> 4",
        "<think>never closed 4",
        [{"role": "assistant", "content": "<think>chat</think> 4"}],  # a conversation
    ]
    assert R.think_format(["p"] * 7, completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "completion, answer, reward",
    [
        ("so the total is \\boxed{\\frac{3}{4}}.", "0.75", 1.0),  # boxed fraction vs decimal
        ("\\boxed{2} then \\boxed{x = 5}", "5", 1.0),  # the LAST box, x = 5 -> 5
        ("\\boxed{{1,000}}", "1000", 1.0),  # nested braces, thousands separator
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "He sold... #### 72", 1.0),  # GSM8K
        ("it costs $18.", "18", 1.0),  # last number, $ and trailing period
        ("50%", "50", 1.0),
        ("3/4 of them", "\\boxed{0.75}", 1.0),
        ("the answer is 7", "8", 0.0),
        ("no number here", "8", 0.0),
        ("\\boxed{x+1}", "x + 1", 1.0),  # not a number: compared as strings sans spaces
        ("\\boxed{12", "12", 1.0),  # box cut off: falls back to the last number
        ("-3", "-3.0000001", 1.0),  # relative tolerance 1e-6
        ("-3", "-3.001", 0.0),
    ],
)
def test_math_answer(completion, answer, reward):
    assert R.math_answer(["p"], [completion], answer=[answer]) == [reward]


def test_math_answer_none_answer_and_numeric_column():
    assert R.math_answer(["p", "q"], ["#### 72", "1"], answer=[72, None]) == [1.0, None]
    assert R.extract_answer("nothing") is None
    assert R.answers_equal("1,234.5", "1234.50")


def test_combine_rewards_weights_none_and_all_none_rows():
    # Three rows, two fns. Row 0: 1*1 + 0.5*2 = 2. Row 1: fn a says None -> 0.5*4 = 2.
    # Row 2: both None -> NaN (the trainer zeroes its advantage).
    def a(prompts, completions, **_):
        return [1.0, None, None]

    def b(prompts, completions, **_):
        return [2.0, 4, None]

    total, per_fn = R.combine_rewards([a, b], [1.0, 0.5], ["p"] * 3, ["c"] * 3, {})
    assert total.dtype == np.float32 and total.shape == (3,)
    np.testing.assert_array_equal(total[:2], [2.0, 2.0])
    assert math.isnan(total[2])
    assert list(per_fn) == ["a", "b"] and math.isnan(per_fn["a"][1])


def test_combine_rewards_passes_columns_names_repeats_and_resolves_strings():
    prompts, completions = ["p", "q"], ["#### 3", "<think>t</think> 4"]
    fmt = R.regex_format(r"#.*")
    total, per_fn = R.combine_rewards(
        ["math_answer", fmt, fmt, "think_format"],
        None,
        prompts,
        completions,
        {"answer": ["3", "5"], "unused": [0, 0]},
    )
    assert list(per_fn) == ["math_answer", "regex_format", "regex_format_1", "think_format"]
    np.testing.assert_array_equal(total, [3.0, 1.0])  # 1+1+1+0 ; 0+0+0+1


def test_combine_rewards_rejects_bad_input():
    one = [R.think_format]
    with pytest.raises(ValueError, match="2 weights for 1"):
        R.combine_rewards(one, [1, 2], ["p"], ["c"])
    with pytest.raises(ValueError, match="2 prompts for 1"):
        R.combine_rewards(one, None, ["p", "q"], ["c"])
    with pytest.raises(ValueError, match="column 'answer' has 2 rows"):
        R.combine_rewards(one, None, ["p"], ["c"], {"answer": [1, 2]})
    with pytest.raises(ValueError, match="returned 2 values for 1"):
        R.combine_rewards([lambda p, c, **_: [1.0, 2.0]], None, ["p"], ["c"])
    with pytest.raises(ValueError, match="non-number"):
        R.combine_rewards([lambda p, c, **_: ["high"]], None, ["p"], ["c"])
    with pytest.raises(ValueError, match="no reward functions"):
        R.combine_rewards([], None, ["p"], ["c"])


def test_resolve_reward_registry_factories_and_dotted_paths():
    assert R.resolve_reward("math_answer") is R.math_answer
    fmt = R.resolve_reward("regex_format", pattern=r"\d+")
    assert fmt(["p", "p"], ["12", "a1"]) == [1.0, 0.0]
    here = __name__
    assert R.resolve_reward(f"{here}:length_reward") is length_reward
    assert R.resolve_reward(f"{here}.length_reward") is length_reward
    assert R.resolve_reward("tandem.align.rl.rewards.exact_match") is R.exact_match
    scorer = R.resolve_reward(f"{here}:Scaled", scale=2.0)
    assert isinstance(scorer, Scaled) and scorer(["p"], ["abc"]) == [6.0]
    total, per_fn = R.combine_rewards([scorer], None, ["p"], ["ab"])
    assert list(per_fn) == ["Scaled"] and total[0] == 4.0


def test_resolve_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        R.resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        R.resolve_reward("no_such_package_xyz.fn")
    with pytest.raises(ValueError, match="has no 'missing'"):
        R.resolve_reward(f"{__name__}:missing")
    with pytest.raises(ValueError, match="not callable"):
        R.resolve_reward(f"{__name__}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="takes no arguments"):
        R.resolve_reward("think_format", scale=2)
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("math_answer")(length_reward)
