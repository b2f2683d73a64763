"""A sequence's host-side state as the scheduler and engine see it, and its request."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

from tandem.serve.output import RequestMetrics, TokenLogprob
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.stops import StopChecker


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """What a client asked for: one prompt, `params.n` sequences sampled from it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = dataclasses.field(default_factory=list)
    stream: bool = True  # emit an output every step (else only when finished)
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None  # set when this request alone failed
    metrics: RequestMetrics | None = None  # stamped at creation (arrival) and per output
    num_generation_tokens: int = 0  # tokens of all n sequences as of the last output

    def __post_init__(self):
        if self.metrics is None:
            self.metrics = RequestMetrics(
                time.monotonic(), n=self.params.n, max_tokens=self.params.max_tokens
            )


@dataclasses.dataclass(eq=False)
class Sequence:
    """One stream of tokens: a prompt and what has been generated after it.

    `num_computed_tokens` counts tokens whose K/V are on device. A running sequence whose
    count equals `num_tokens` is decoding; below it, it is still prefilling in chunks.
    Preemption frees the pages and zeroes the count; nothing else is lost, and the
    tokens so far are recomputed as one longer prompt when the sequence is readmitted.

    The engine samples on device, a call or several steps ahead of the host:
    `num_inflight_tokens` counts tokens sampled there and not yet seen here. They count in
    `num_tokens` (so the scheduler plans with them) but not in `output_token_ids`.
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
    first_scheduled_time: float | None = None  # time.monotonic() of its first admission
    max_num_tokens: int = 2**62  # prompt + completion cap: no decode step is planned past it
    status: Status = Status.WAITING
    finish_reason: str | None = None
    num_inflight_tokens: int = 0
    # The engine's: the request, which of its n completions this is, the device slot,
    # detokenization and stop strings, logprobs so far. The scheduler reads none of them.
    request: Request | None = None
    index: int = 0
    slot: int | None = None
    num_pages_sent: int = 0  # block-table entries the device has for the slot
    num_ids_emitted: int = 0  # output ids already returned in an output
    stops: StopChecker | None = None
    logprobs: list[TokenLogprob] | None = None
    host_mask: Any = None  # serve/host_masks.py HostMask: a grammar, long bad words

    @property
    def token_ids(self) -> list[int]:
        """The tokens known on the host (in-flight ones not yet)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens still to compute: the rest of the prompt, or the one just sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_generated > 0 and self.num_pending_tokens == 1

    def append_until_stop(self, produced: list[int], result, row: int, eos: set[int]):
        """Appends the tokens the device produced (a StepResult's column `row`, steps in
        order) up to and including the first that ends the sequence; returns (the tokens
        appended, the finish reason or None). The one place a stop is decided on the host:
        stop ids and EOS (as the device decided too), stop strings (text past a stop is
        never emitted) and the length cap."""
        params = self.request.params
        check_strings = bool(params.stop) and self.stops is not None
        accepted, reason = [], None
        for j, token in enumerate(produced):
            self.output_token_ids.append(token)
            accepted.append(token)
            if self.logprobs is not None:
                k = params.logprobs
                top = list(
                    zip(
                        result.top_ids[j, row, :k].tolist(),
                        result.top_logprobs[j, row, :k].tolist(),
                    )
                )
                self.logprobs.append(TokenLogprob(token, float(result.logprobs[j, row]), top))
            # Stop ids count from min_tokens on: the device banned them until then.
            is_stop_id = (not params.ignore_eos and token in eos) or token in params.stop_token_ids
            if is_stop_id and len(self.output_token_ids) > params.min_tokens:
                reason = "stop"
            if check_strings and self.stops.append(self.output_token_ids, reason is not None):
                reason = "stop"
            if reason is None and self.num_known_tokens >= self.max_num_tokens:
                reason = "length"
            if reason is not None:
                break
        if check_strings and reason == "length":
            self.stops.flush()
        return accepted, reason
