"""prompt_logprobs: the log-probability of each prompt token given the ones before it."""

from __future__ import annotations

import numpy as np

from tandem.serve.output import TokenLogprob
from tandem.serve.sequence import Request


def record_prompt_logprobs(request: Request, start: int, logits: np.ndarray) -> None:
    """Appends the entries that one computed prompt chunk gives: `logits` f32[n, V] are
    those of prompt positions start..start+n-1, each predicting the next token. Raw or
    scaled (as `logprobs_mode` says), with the top `prompt_logprobs` alternatives; the
    first prompt token has none (None)."""
    params = request.params
    k = params.prompt_logprobs
    rows = logits / params.logprob_temperature
    if request.prompt_logprobs is None:
        request.prompt_logprobs = [None]
    # A sequence preempted part-way through its prompt recomputes it from the start:
    # entries past this chunk's first position are replaced, not repeated.
    del request.prompt_logprobs[start + 1 :]
    logp = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
    prompt = request.prompt_token_ids
    for i in range(rows.shape[0]):
        pos = start + i + 1  # the token these logits predict
        if pos >= len(prompt):
            break
        top = np.argsort(-logp[i])[:k]
        request.prompt_logprobs.append(
            TokenLogprob(
                prompt[pos], float(logp[i, prompt[pos]]), [(int(t), float(logp[i, t])) for t in top]
            )
        )
