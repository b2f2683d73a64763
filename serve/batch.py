"""Host-side batch building: a step's sequences and new tokens -> AttentionMetadata (numpy).

Shapes are padded to buckets so the jitted step compiles once per bucket: T new tokens,
S sequences, and pages_per_seq block-table columns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tandem.model.attention_metadata import AttentionMetadata


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: `token_ids` are new, starting at `start_pos`."""

    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical pages, enough for start_pos + len(token_ids)


def build_batch(
    chunks: list[SeqChunk], page_size: int, *, num_tokens: int, num_seqs: int, pages_per_seq: int
) -> tuple[np.ndarray, AttentionMetadata]:
    """Packs chunks into padded arrays: (tokens i32[T], metadata over T and S)."""
    total = sum(len(c.token_ids) for c in chunks)
    if total > num_tokens or len(chunks) > num_seqs:
        raise ValueError(
            f"batch of {total} tokens / {len(chunks)} seqs exceeds the bucket "
            f"({num_tokens} tokens, {num_seqs} seqs)"
        )
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, -1, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    page_indices = np.zeros((num_seqs, pages_per_seq), np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    t = 0
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start_pos + n
        if len(c.block_table) * page_size < end or len(c.block_table) > pages_per_seq:
            raise ValueError(
                f"sequence {s}: block table of {len(c.block_table)} pages cannot "
                f"hold {end} tokens within {pages_per_seq} pages of {page_size}"
            )
        pos = np.arange(c.start_pos, end)
        table = np.asarray(c.block_table, np.int32)
        tokens[t : t + n] = c.token_ids
        positions[t : t + n] = pos
        slot_mapping[t : t + n] = table[pos // page_size] * page_size + pos % page_size
        kv_lens[s] = end
        page_indices[s, : len(table)] = table
        t += n
        cu_q_lens[s + 1] = t
    cu_q_lens[len(chunks) + 1 :] = t
    md = AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        kv_lens=kv_lens,
        page_indices=page_indices,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([len(chunks)], np.int32),
    )
    return tokens, md
