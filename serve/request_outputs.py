"""The engine's outputs: per request that changed, its n completions so far and the delta,
and when its stages happened (`RequestMetrics`, stamped here as the tokens arrive)."""

from __future__ import annotations

import time

from tandem.serve.output import CompletionOutput, RequestMetrics, RequestOutput
from tandem.serve.sequence import Request, Sequence, Status


def request_outputs(changed: list[Sequence]) -> list[RequestOutput]:
    """One output per request with a changed sequence: every step for a streamed request,
    only the last for the others. A request finishes when all n sequences have."""
    by_request: dict[str, Request] = {}
    for seq in changed:
        by_request[seq.request.request_id] = seq.request
    outputs = []
    now = time.monotonic()
    for request_id, request in by_request.items():
        finished = len(request.seqs) == request.params.n and all(
            s.status == Status.FINISHED for s in request.seqs
        )
        _stamp(request, finished, now)
        if not (finished or request.stream):
            continue
        completions = []
        for seq in sorted(request.seqs, key=lambda s: s.index):
            stops = seq.stops
            if stops is not None and not request.params.stop:
                # Text is decoded here, once per output, unless stop strings needed it
                # token by token.
                stops.append(seq.output_token_ids, seq.status == Status.FINISHED)
            text, new_text = stops.take() if stops is not None else ("", "")
            new_ids = seq.output_token_ids[seq.num_ids_emitted :]
            seq.num_ids_emitted = len(seq.output_token_ids)
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=list(seq.output_token_ids),
                    new_text=new_text,
                    new_token_ids=new_ids,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                )
            )
        outputs.append(
            RequestOutput(
                request_id,
                request.prompt_token_ids,
                completions,
                finished,
                request.num_cached_tokens,
                request.prompt_logprobs,
                error=request.error,
                metrics=request.metrics.snapshot(),  # later steps change the original
            )
        )
    return outputs


def _stamp(request: Request, finished: bool, now: float) -> None:
    """Records the step's time as the request's last (and maybe first) token time when
    any of its sequences got tokens (streamed or not), and as its finish time."""
    metrics: RequestMetrics = request.metrics
    if metrics.first_scheduled_time is None:
        metrics.first_scheduled_time = request.seqs[0].first_scheduled_time
    num_tokens = sum(len(s.output_token_ids) for s in request.seqs)
    if num_tokens > request.num_generation_tokens:
        request.num_generation_tokens = num_tokens
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
    if finished:
        metrics.finished_time = now
