"""Reward functions for RL on verifiable tasks, in TRL's calling convention.

A reward function is any callable

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

with one entry per completion; the dataset's other columns arrive as keyword lists
(`answer=[...]`), and a function ignores the ones it does not need (`**_`). None means "this
function does not apply to this row" (TRL): `combine_rewards` skips it. A completion may also
be a conversation (a list of {"role", "content"} messages); its last message is scored.

Objects with `__call__` of that signature fit too (a reward model scorer that holds its
params): register one with `register_reward` or name its class by dotted path in a gin file.

Rewards live in the registry under two categories: "reward" (reward functions) and
"reward_factory" (functions that build one from keyword arguments, as `regex_format`); a
name is taken in both at once, since `resolve_reward` looks in both.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from tandem.align import registry


class RewardFn(Protocol):
    def __call__(
        self, prompts: list[str], completions: list[Any], **columns: list
    ) -> list[float | None]: ...


def register_reward(name: str, *, factory: bool = False):
    """Decorator: adds a reward function (or a factory of one) under `name`, which must be
    free in both reward categories."""
    if name in registry.names("reward") + registry.names("reward_factory"):
        raise ValueError(f"a reward named {name!r} is already registered")
    return registry.register("reward_factory" if factory else "reward", name)


# Verifiable rewards.


@register_reward("exact_match")
def exact_match(
    prompts: list[str], completions: list[Any], answer: list | None = None, **_
) -> list[float | None]:
    """1.0 if the completion equals the row's `answer` after stripping whitespace, else 0.0;
    None where the answer is None."""
    answer = _column("exact_match", "answer", answer, len(completions))
    return [
        None if a is None else float(_content(c).strip() == str(a).strip())
        for c, a in zip(completions, answer)
    ]


@register_reward("regex_format", factory=True)
def regex_format(pattern: str, flags: int = re.DOTALL) -> RewardFn:
    """A reward fn: 1.0 if the whole completion matches `pattern` (re.fullmatch; `.` also
    matches newlines by default), else 0.0."""
    try:
        compiled = re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"regex_format: bad pattern {pattern!r}: {e}") from e

    def regex_format(prompts: list[str], completions: list[Any], **_) -> list[float | None]:
        return [float(compiled.fullmatch(_content(c)) is not None) for c in completions]

    return regex_format


@register_reward("think_format")
def think_format(prompts: list[str], completions: list[Any], **_) -> list[float | None]:
    """DeepSeek-R1's format: 1.0 for `<think>reasoning</think> answer` (one think block at
    the start, no stray tags, a non-empty answer after it), else 0.0. Surrounding
    whitespace is ignored. A chat template that opens `<think>` in the prompt needs a
    regex_format reward instead."""
    out = []
    for c in completions:
        text = _content(c).strip()
        ok = (
            text.startswith("<think>")
            and text.count("<think>") == 1
            and text.count("</think>") == 1
            and bool(text.split("</think>", 1)[1].strip())
        )
        out.append(float(ok))
    return out


@register_reward("math_answer")
def math_answer(
    prompts: list[str], completions: list[Any], answer: list | None = None, **_
) -> list[float | None]:
    """1.0 if the completion's final answer equals the row's `answer`, else 0.0 (also when
    no answer can be found); None where the answer is None.

    The completion's final answer is the last `\\boxed{...}`, else the text after the last
    `#### `, else the last number. The reference answer is read the same way when it holds
    `\\boxed{}` or `####` (a GSM8K or MATH solution), else taken whole. Both sides compare
    as numbers when they parse as one (`1,000`, `$5`, `50%`, `3/4`, `\\frac{3}{4}`, `x = 2`;
    relative tolerance 1e-6), else as strings without spaces.
    """
    answer = _column("math_answer", "answer", answer, len(completions))
    out = []
    for c, a in zip(completions, answer):
        if a is None:
            out.append(None)
            continue
        ref = str(a)
        ref = _marked_answer(ref) or ref
        got = extract_answer(_content(c))
        out.append(float(got is not None and answers_equal(got, ref)))
    return out


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: last \\boxed{}, else after the last ####, else the
    last number; None if there is none."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def answers_equal(a: str, b: str) -> bool:
    """Numerically equal (rel tol 1e-6) when both parse as numbers, else equal as strings
    without whitespace, `$` and a trailing period."""
    x, y = _to_number(a), _to_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    return _normalise(a) == _normalise(b)


def _marked_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = re.findall(r"####\s*([^\n]*)", text)
    return hashes[-1].strip() if hashes and hashes[-1].strip() else None


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the completion was cut off inside the box


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).replace("$", "").rstrip(".")


def _to_number(s: str) -> float | None:
    s = _normalise(s)
    while s.startswith("{") and s.endswith("}"):  # \boxed{{5}}
        s = s[1:-1]
    s = re.sub(r"\\text\{[^{}]*\}", "", s).replace("\\%", "").replace("%", "").replace("\\!", "")
    if "=" in s:  # "x=2": the value
        s = s.rsplit("=", 1)[1]
    frac = re.fullmatch(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if frac:
        s = f"{frac[1]}{frac[2]}/{frac[3]}"
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


# Combining and naming rewards.


def combine_rewards(
    fns: Sequence[RewardFn | str],
    weights: Sequence[float] | None,
    prompts: list[str],
    completions: list[Any],
    columns: dict[str, list] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Scores every completion with every fn and sums with weights (TRL's semantics):

        total_i = nansum_j w_j * r_ij     (r_ij = NaN where fn j returned None)

    and total_i = NaN where every fn returned None (the trainer zeroes that row's
    advantage). Returns (total f32[N], {fn name: r_j f32[N]}). Names given as strings are
    resolved by `resolve_reward`; repeated names get a suffix _1, _2, ...
    """
    fns = [resolve_reward(f) if isinstance(f, str) else f for f in fns]
    if not fns:
        raise ValueError("combine_rewards: no reward functions")
    weights = [1.0] * len(fns) if weights is None else [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"combine_rewards: {len(weights)} weights for {len(fns)} functions")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"combine_rewards: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"combine_rewards: column {k!r} has {len(v)} rows, expected {n}")
    per_fn: dict[str, np.ndarray] = {}
    for fn in fns:
        name = reward_name(fn)
        key, i = name, 0
        while key in per_fn:
            i += 1
            key = f"{name}_{i}"
        values = fn(list(prompts), list(completions), **columns)
        if len(values) != n:
            raise ValueError(f"reward {name!r} returned {len(values)} values for {n} rows")
        try:
            per_fn[key] = np.array([np.nan if v is None else float(v) for v in values], np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"reward {name!r} returned a non-number: {e}") from e
    r = np.stack(list(per_fn.values()), axis=1)  # [N, F]
    weighted = r * np.asarray(weights, np.float32)[None, :]
    none_applies = np.isnan(r).all(axis=1)
    total = np.where(none_applies, np.nan, np.nansum(weighted, axis=1)).astype(np.float32)
    return total, per_fn


def reward_name(fn: Any) -> str:
    """A function's __name__, or an object's class name."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def resolve_reward(spec: str | Callable, **kwargs) -> RewardFn:
    """A reward fn from a name (what gin files hold):

    - a registered reward ("math_answer");
    - a registered reward factory, called with kwargs ("regex_format", pattern=...);
    - an importable "package.module:function" or "package.module.function" (user code);
    - a callable, used as is.

    A class found this way is instantiated with kwargs (a scorer object); any other
    resolved callable given kwargs is treated as a factory and called with them. Raises
    ValueError for unknown names, failed imports and non-callable results.
    """
    if callable(spec) and not isinstance(spec, str):
        obj = spec
    elif not isinstance(spec, str) or not spec:
        raise ValueError(f"resolve_reward: expected a name or a callable, got {spec!r}")
    elif spec in registry.names("reward"):
        if kwargs:
            raise ValueError(f"reward {spec!r} takes no arguments, got {sorted(kwargs)}")
        return registry.get("reward", spec)
    elif spec in registry.names("reward_factory"):
        obj = registry.get("reward_factory", spec)
    elif ":" in spec or "." in spec:
        obj = _import(spec)
    else:
        known = registry.names("reward") + registry.names("reward_factory")
        raise ValueError(
            f"unknown reward {spec!r}: not one of {known} nor a 'module.path:function' path"
        )
    if not callable(obj):
        raise ValueError(f"reward {spec!r} resolves to {obj!r}, which is not callable")
    is_factory = isinstance(spec, str) and spec in registry.names("reward_factory")
    if isinstance(obj, type) or kwargs or is_factory:
        obj = obj(**kwargs)  # a class or a factory builds the reward fn
    if not callable(obj):
        raise ValueError(f"reward {spec!r} resolves to {obj!r}, which is not callable")
    return obj


def _import(path: str) -> Any:
    """'pkg.mod:attr.sub' or 'pkg.mod.attr': the longest importable module prefix, then
    attribute lookups."""
    if ":" in path:
        module_name, _, attrs = path.partition(":")
        candidates = [(module_name, attrs.split(".") if attrs else [])]
    else:
        parts = path.split(".")
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    errors = []
    for module_name, attrs in candidates:
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            errors.append(f"{module_name}: {e}")
            continue
        try:
            for attr in attrs:
                obj = getattr(obj, attr)
        except AttributeError:
            missing = ".".join(attrs)
            raise ValueError(
                f"reward {path!r}: module {module_name!r} has no {missing!r}"
            ) from None
        if not attrs:
            raise ValueError(f"reward {path!r} names a module, not a function")
        return obj
    raise ValueError(f"reward {path!r}: cannot import it ({'; '.join(errors)})")


def _column(fn: str, name: str, values: list | None, n: int) -> list:
    if values is None:
        raise ValueError(f"{fn} needs the dataset column {name!r} (a keyword list)")
    if len(values) != n:
        raise ValueError(f"{fn}: column {name!r} has {len(values)} rows for {n} completions")
    return list(values)


def _content(completion: Any) -> str:
    """The text of a completion: a string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise ValueError(f"a completion must be a str or a list of messages, got {completion!r}")
