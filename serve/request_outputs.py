"""The engine's outputs: per request that changed, its n completions so far and the delta."""

from __future__ import annotations

from tandem.serve.output import CompletionOutput, RequestOutput
from tandem.serve.sequence import Request, Sequence, Status


def request_outputs(changed: list[Sequence]) -> list[RequestOutput]:
    """One output per request with a changed sequence: every step for a streamed request,
    only the last for the others. A request finishes when all n sequences have."""
    by_request: dict[str, Request] = {}
    for seq in changed:
        by_request[seq.request.request_id] = seq.request
    outputs = []
    for request_id, request in by_request.items():
        finished = len(request.seqs) == request.params.n and all(
            s.status == Status.FINISHED for s in request.seqs
        )
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
            )
        )
    return outputs
