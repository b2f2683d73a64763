"""A mixed step's host-side layout: scheduled chunks -> `MixedInputs` and sampled rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from tandem.serve.model_runner import MixedInputs, mixed_inputs
from tandem.serve.scheduler import SchedulerOutput
from tandem.serve.sequence import Sequence


@dataclasses.dataclass
class MixedStep:
    inputs: MixedInputs
    rows: list[tuple[Sequence, int, int]]  # (sequence, sampled row, tokens in flight: 1)
    prompt_chunks: list[tuple[Sequence, int, int, int]]  # (seq, start, n, offset in T)
    want_logits: bool  # a chunk of a prompt_logprobs request is computed


def mixed_step(plan: SchedulerOutput, forks: dict, *, num_tokens: int, num_slots: int) -> MixedStep:
    """Packs the plan's chunks along T: a prompt chunk's tokens, a decode's one token
    (read from its slot on device). Each completing chunk samples one row per member of
    its group (the sequence, then the children forking from it now)."""
    inp = mixed_inputs(num_tokens, num_slots)
    rows: list[tuple[Sequence, int, int]] = []
    prompt_chunks = []
    want_logits = False
    t = 0
    for s, chunk in enumerate(plan.chunks):
        seq = chunk.seq
        n = 1 if chunk.is_decode else chunk.num_tokens
        inp["token_slots"][t : t + n] = seq.slot
        inp["positions"][t : t + n] = np.arange(chunk.start, chunk.start + n)
        if chunk.is_decode:
            inp["is_decode"][t] = 1
        else:
            inp["token_ids"][t : t + n] = chunk.token_ids
            if seq.request.params.prompt_logprobs is not None and seq.index == 0:
                want_logits = True
                # Only the first pass over the prompt (not a recompute after preemption);
                # the token this chunk samples is already counted in flight.
                if seq.num_generated == int(chunk.completes):
                    prompt_chunks.append((seq, chunk.start, n, t))
        inp["seq_slots"][s] = seq.slot
        inp["kv_lens"][s] = chunk.start + n
        t += n
        inp["cu_q_lens"][s + 1] = t
        if chunk.completes:
            for member in [seq, *forks.get(seq, ())]:
                r = len(rows)
                inp["sample_rows"][r] = t - 1
                inp["sample_slots"][r] = member.slot
                inp["sample_positions"][r] = chunk.start + n
                inp["sample_is_decode"][r] = int(chunk.is_decode)
                rows.append((member, r, 1))
    inp["cu_q_lens"][len(plan.chunks) + 1 :] = t
    inp["num_seqs"][0] = len(plan.chunks)
    return MixedStep(MixedInputs(**inp), rows, prompt_chunks, want_logits)
