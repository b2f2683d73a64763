"""The loss registry: name -> pure function returning `(loss, metrics)`.

Kept apart from `losses.py` (the front door, which imports every loss module) so that the
loss modules can register themselves without an import cycle. Trainers call
`tandem.align.losses.get_loss(name)`, which sees every registered loss.
"""

from __future__ import annotations

from collections.abc import Callable

LOSSES: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: file `fn` under `name` in LOSSES; a second loss with the same name is an error."""

    def add(fn: Callable) -> Callable:
        if name in LOSSES and LOSSES[name] is not fn:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return add
