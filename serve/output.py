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
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None
    error: str | None = None  # this request alone failed (finish_reason "error")
