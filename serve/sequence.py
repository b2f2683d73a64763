"""A sequence's host-side state as the scheduler and engine see it."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One stream of tokens: a prompt and what has been generated after it.

    `num_computed_tokens` counts tokens whose K/V are on device. A running sequence whose
    count equals `num_tokens` is decoding; below it, it is still prefilling in chunks.
    Preemption frees the pages and zeroes the count; nothing else is lost, and the
    tokens so far are recomputed as one longer prompt when the sequence is readmitted.
    """

    seq_id: Any
    prompt_token_ids: list[int]
    client: str = "default"
    priority: int = 0  # lower runs first (vLLM's convention)
    arrival: int = 0  # admission order; ties in every policy break by it
    namespace: Any = None  # prefix-cache namespace (an adapter id, a policy version)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of the first admission
    num_preemptions: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    data: Any = None  # the engine's per-sequence payload; the scheduler never reads it

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute: the rest of the prompt, or the one just sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return bool(self.output_token_ids) and self.num_pending_tokens == 1
