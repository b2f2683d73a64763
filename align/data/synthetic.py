"""Tiny deterministic datasets for learning tests: arithmetic and letter preferences.

Both are small enough for a model of a few thousand parameters on CPU, and their targets
follow a rule, so a test can assert that training learned it.
"""

from __future__ import annotations

import numpy as np

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
LETTERS = "abcdefgh"


def synthetic_arithmetic(
    num: int, *, seed: int, max_operand: int = 9, ops: str = "+-"
) -> list[dict]:
    """`num` records {"prompt": "3+4=", "answer": "7", "completion": "7"}.

    The same records feed SFT (prompt + completion) and RL (prompt, with `answer` for the
    reward function). Operands are uniform in [0, max_operand]; for "-" the larger comes
    first so answers are never negative.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(max_operand, int) or max_operand < 0:
        raise ValueError(f"max_operand must be an int >= 0, got {max_operand!r}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of {''.join(OPS)}, got {ops!r}")
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(num):
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        op = ops[int(rng.integers(len(ops)))]
        if op == "-" and b > a:
            a, b = b, a
        answer = str(OPS[op](a, b))
        records.append({"prompt": f"{a}{op}{b}=", "answer": answer, "completion": answer})
    return records


def synthetic_preferences(num: int, *, seed: int, length: int = 3) -> list[dict]:
    """`num` records {"prompt": "c:", "chosen": "ccc", "rejected": "fff"}.

    The preferred completion repeats the prompt's letter; the rejected one repeats another
    letter from the same alphabet, so the preference is learnable from the prompt alone.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(num):
        good = int(rng.integers(len(LETTERS)))
        # A uniform other letter: shift by 1..len-1 around the alphabet.
        bad = (good + 1 + int(rng.integers(len(LETTERS) - 1))) % len(LETTERS)
        records.append(
            {
                "prompt": f"{LETTERS[good]}:",
                "chosen": LETTERS[good] * length,
                "rejected": LETTERS[bad] * length,
            }
        )
    return records
