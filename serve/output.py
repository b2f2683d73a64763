"""What the engine returns: per request, its n completions so far and what is new."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log_softmax of the logits, or of logits / T with logprobs_mode="scaled"
    top: list[tuple[int, float]]  # the most likely alternatives, most likely first


@dataclasses.dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # all visible text so far
    token_ids: list[int]  # all generated ids so far
    new_text: str  # the delta since the previous output of this request
    new_token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length" or "abort"; None while running


@dataclasses.dataclass
class RequestMetrics:
    """When a request went through the engine's stages (vLLM's RequestStateStats), in the
    engine process's `time.monotonic()` seconds, plus the two parameters its histograms
    read. Every interval the HTTP layer takes is between two of these stamps, so they never
    meet the front end's clock (on Linux CLOCK_MONOTONIC is system-wide, so they would
    agree on one host anyway; not across hosts).

    queue = first_scheduled - arrival; prefill = first_token - first_scheduled (a
    preemption during it counts in it); decode = last_token - first_token; inference =
    last_token - first_scheduled."""

    arrival_time: float  # the engine took the request (add_request)
    n: int = 1  # the request's `n` and `max_tokens`
    max_tokens: int = 0
    first_scheduled_time: float | None = None  # first admitted to a step: queueing ends
    first_token_time: float | None = None  # its first token reached the host: prefill ends
    last_token_time: float | None = None  # the step that brought this output's new tokens
    finished_time: float | None = None

    def snapshot(self) -> RequestMetrics:
        """A copy for an output (the engine keeps stamping its own). Per request per step:
        a third of what `dataclasses.replace` costs."""
        return RequestMetrics(**vars(self))


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None
    error: str | None = None  # this request alone failed (finish_reason "error")
    metrics: RequestMetrics | None = None  # a snapshot as of this output
