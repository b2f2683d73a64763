"""Which sequence holds which slot of the device batch, and the diffs that keep it true.

A sequence takes the lowest free slot when it first runs (so decode calls cover a short
prefix of the slots) and gives it back once it is no longer running (finished, aborted or
preempted). `sync` sends the device what changed since the last call: the rows of
sequences joining, cleared rows of those that left, the block-table entries from the
first page each sequence writes in this call, and the tokens of penalised prompts.
"""

from __future__ import annotations

import heapq

from tandem.paged_cache import BlockManager
from tandem.serve.buckets import bucket_for
from tandem.serve.device_batch import slot_rows
from tandem.serve.model_runner import ModelRunner
from tandem.serve.sampler import bias_entries, has_bias
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.sequence import Sequence, Status


class SlotTable:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, vocab_size: int, stop_ids):
        self.runner = runner
        self.blocks = blocks
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids  # SamplingParams -> the ids the device stops on
        self.num_slots = runner.num_slots
        self._free = list(range(self.num_slots))  # a heap: lowest slot first
        self._owner: list[Sequence | None] = [None] * self.num_slots

    def sync(self, members: list[tuple[Sequence, int]]) -> None:
        """Frees the slots of sequences that left, gives slots to the `members` (sequence,
        first position this call writes) without one, and sends the device their rows and
        every member's block-table entries from that position's page on."""
        cleared = []
        for slot, owner in enumerate(self._owner):
            if owner is not None and owner.status != Status.RUNNING:
                owner.slot = None
                self._owner[slot] = None
                heapq.heappush(self._free, slot)
                cleared.append(slot)
        joining = [seq for seq, _ in members if seq.slot is None]
        for seq in joining:
            seq.slot = heapq.heappop(self._free)
            seq.num_pages_sent = 0
            self._owner[seq.slot] = seq
        taken = {seq.slot for seq in joining}
        cleared = [slot for slot in cleared if slot not in taken]
        if joining or cleared:
            self._send_rows(joining, cleared)
        entries = []
        page_size = self.blocks.block_size
        for seq, start in members:
            # From the first page this call writes (copy-on-write may have replaced it).
            first = min(seq.num_pages_sent, start // page_size)
            table = self.blocks.block_table(seq.seq_id, first)
            entries += [(seq.slot, first + i, page) for i, page in enumerate(table)]
            seq.num_pages_sent = first + len(table)
        if entries:
            self.runner.write_pages(entries)

    def _send_rows(self, joining: list[Sequence], cleared: list[int]) -> None:
        none = [0] * len(cleared)
        self.runner.set_slots(
            slot_rows(
                [seq.slot for seq in joining] + cleared,
                [seq.request.params for seq in joining] + [SamplingParams()] * len(cleared),
                sample_indices=[seq.index for seq in joining] + none,
                num_generated=[len(seq.output_token_ids) for seq in joining] + none,
                max_num_tokens=[seq.max_num_tokens for seq in joining] + none,
                stop_ids=[self.stop_ids(seq.request.params) for seq in joining]
                + [[]] * len(cleared),
                num_slots=self.num_slots,
                pad_to=bucket_for(len(joining) + len(cleared), self.runner.slot_buckets),
                vocab_size=self.vocab_size,
            )
        )
        # A penalised sequence's history: prompt tokens mark the prompt mask; output tokens
        # (a sequence recomputed after preemption) count as generated.
        penalties = [
            (seq.slot, token, int(i >= len(seq.prompt_token_ids)))
            for seq in joining
            if seq.request.params.uses_penalties
            for i, token in enumerate(seq.token_ids)
        ]
        if penalties:
            self.runner.add_penalty_tokens(penalties)
        bias = [
            (seq.slot, token, value)
            for seq in joining
            if has_bias(seq.request.params)
            for token, value in bias_entries(seq.request.params)[1]
        ]
        if bias:
            self.runner.set_bias(bias)
