"""A mixed step's host-side layout: scheduled chunks -> `MixedInputs` and sampled rows."""

from __future__ import annotations

import dataclasses

import numpy as np

from tandem.serve.scheduler import SchedulerOutput
from tandem.serve.sequence import Sequence
from tandem.serve.steps import MixedInputs, mixed_inputs


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
    chunks = plan.chunks
    # Per token (vectorised: a step holds hundreds of decodes).
    lens = np.array([1 if c.is_decode else c.num_tokens for c in chunks], np.int32)
    starts = np.array([c.start for c in chunks], np.int32)
    slots = np.array([c.seq.slot for c in chunks], np.int32)
    ends = np.cumsum(lens, dtype=np.int32)
    offsets = ends - lens
    t = int(ends[-1]) if len(chunks) else 0
    owner = np.repeat(np.arange(len(chunks)), lens)
    inp["token_slots"][:t] = slots[owner]
    inp["positions"][:t] = starts[owner] + np.arange(t, dtype=np.int32) - offsets[owner]
    is_decode = np.array([c.is_decode for c in chunks], bool)
    inp["is_decode"][offsets[is_decode]] = 1
    # Per sequence row.
    s = len(chunks)
    inp["seq_slots"][:s] = slots
    inp["kv_lens"][:s] = starts + lens
    inp["cu_q_lens"][1 : s + 1] = ends
    inp["cu_q_lens"][s + 1 :] = t
    inp["num_seqs"][0] = s
    # Prompt chunks (a few per step) and sampled rows.
    rows: list[tuple[Sequence, int, int]] = []
    sample = []  # (token, slot, position, is_decode) per sampled row
    prompt_chunks = []
    want_logits = False
    for chunk, start, end in zip(chunks, offsets.tolist(), ends.tolist()):
        seq = chunk.seq
        if chunk.is_decode:  # the common case, kept short
            rows.append((seq, len(rows), 1))
            sample.append((start, seq.slot, chunk.start + 1, 1))
            continue
        inp["token_ids"][start:end] = chunk.token_ids
        if seq.request.params.prompt_logprobs is not None and seq.index == 0:
            want_logits = True
            # Only the first pass over the prompt (not a recompute after preemption); the
            # token this chunk samples is already counted in flight.
            if seq.num_generated == int(chunk.completes):
                prompt_chunks.append((seq, chunk.start, end - start, start))
        if chunk.completes:
            for member in [seq, *forks.get(seq, ())]:
                rows.append((member, len(rows), 1))
                sample.append((end - 1, member.slot, chunk.start + end - start, 0))
    if sample:
        r = len(sample)
        columns = np.array(sample, np.int32).T
        for name, column in zip(
            ("sample_rows", "sample_slots", "sample_positions", "sample_is_decode"), columns
        ):
            inp[name][:r] = column
    return MixedStep(MixedInputs(**inp), rows, prompt_chunks, want_logits)
