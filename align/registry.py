"""One registry of named functions, by category (Tunix's function_registry).

    @register("advantage", "rloo")
    def rloo_advantages(rewards, group_size, *, scale, epsilon): ...

    get("advantage", "rloo")    # the function; a ValueError lists the known names otherwise
    names("advantage")          # ['dr_grpo', 'grpo', 'rloo']

A trainer or a gin file knows only the name. Every function of a category is called the same
way, so a caller never branches on the name:

- "loss" (front door `losses.get_loss`):
  `fn(*arrays, normalizer=N, **options) -> (loss, metrics)`
- "advantage" (`rl.advantages.get_advantage`):
  `fn(rewards f32[B], group_size, *, scale, epsilon) -> f32[B]`
- "reward" (`rl.rewards.resolve_reward`):
  `fn(prompts, completions, **columns) -> list[float | None]`
- "reward_factory" (`rl.rewards.resolve_reward`): `fn(**options) -> a reward function`

A module registers its functions when it is imported; each category's front door imports
them all. Plain Python: no jax here.
"""

from __future__ import annotations

from collections.abc import Callable

CATEGORIES = {
    "loss": "losses",
    "advantage": "advantages",
    "reward": "rewards",
    "reward_factory": "reward factories",
}
"""Category -> its plural, for messages."""

_FUNCTIONS: dict[str, dict[str, Callable]] = {category: {} for category in CATEGORIES}


def register(category: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: files `fn` under `name` in `category`; another function under a taken name
    is an error (the same one again is not, so a module can be reloaded)."""
    functions = _category(category)

    def add(fn: Callable) -> Callable:
        if name in functions and functions[name] is not fn:
            raise ValueError(f"{category} {name!r} is already registered")
        functions[name] = fn
        return fn

    return add


def get(category: str, name: str) -> Callable:
    """The function registered as `name` in `category`; a ValueError lists the known names."""
    functions = _category(category)
    if name not in functions:
        raise ValueError(
            f"unknown {category} {name!r}; known {CATEGORIES[category]}: {sorted(functions)}"
        )
    return functions[name]


def names(category: str) -> list[str]:
    """The names registered in `category`, sorted."""
    return sorted(_category(category))


def _category(category: str) -> dict[str, Callable]:
    if category not in _FUNCTIONS:
        raise ValueError(f"unknown registry category {category!r}; known: {sorted(CATEGORIES)}")
    return _FUNCTIONS[category]
