"""The one immutable pytree that carries a serving step's layout from engine to kernel."""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each new token sits and which pages each sequence reads.

    T is the padded number of new tokens in the step, S the padded number of sequences.
    Padding tokens have slot -1 (their K/V are dropped) and belong to no sequence.
    """

    positions: jax.Array  # i32[T] position of each new token in its sequence
    slot_mapping: jax.Array  # i32[T] page * page_size + offset where its K/V go; -1 to drop
    kv_lens: jax.Array  # i32[S] keys per sequence after this step's tokens are written
    page_indices: jax.Array  # i32[S, pages_per_seq] the block table
    cu_q_lens: jax.Array  # i32[S + 1] prefix sums of new tokens per sequence
    num_seqs: jax.Array  # i32[1] sequences in use
