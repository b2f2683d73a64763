"""Per-sequence block tables over a `BlockPool`: allocate, append, fork, free.

This is the host half of paged attention. The device only ever sees what this file
computes, as int32 arrays: each sequence's `block_table` and each token's `slot`. It is
plain Python so that the scheduler can ask "does this fit?" (`can_allocate`,
`can_append`) cheaply and tests can run without a device.

Tokens flow through here, not only counts, because prefix caching keys blocks by
content: a block is registered in the cache the moment its last token arrives, whether
that token came with the prompt or from decoding.

Forked sequences (n > 1 sampling, a GRPO group) share their parent's blocks. A shared
full block is never written again, so it stays shared for good; the shared partial last
block is copied on write by whichever sequence appends to it while others still hold it.
The copy itself happens on device, so `append` returns it to the engine as a `BlockCopy`.

A full block enters the prefix cache only once its K/V are on device: the engine calls
`commit(seq_id, num_computed_tokens)` after each step, and blocks wholly below that
count are registered (vLLM V1 does the same). Registering at `allocate` would let a
second request skip tokens whose K/V a chunked prefill has not written yet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import NamedTuple

from tandem.paged_cache.block_hash import BlockHash, Namespace, hash_block_tokens, hash_full_blocks
from tandem.paged_cache.block_pool import BlockPool, NoFreeBlocksError

SeqId = Hashable


class BlockCopy(NamedTuple):
    """Copy-on-write the engine must perform on device before writing: src -> dst."""

    src_block: int
    dst_block: int


@dataclasses.dataclass
class _SequenceBlocks:
    token_ids: list[int]
    block_table: list[int]
    block_hashes: list[BlockHash]  # chained keys of the full blocks; empty without caching
    namespace: Namespace
    num_committed_blocks: int = 0  # leading blocks whose K/V are computed (and cached)


class BlockManager:
    """Maps sequences to physical KV blocks of `block_size` tokens each.

    Sequence ids are any hashable (an int, a request id string). Every mutation has a
    query that says whether it will succeed: `can_allocate` before `allocate`,
    `can_append` before `append`. A mutation that would fail raises before changing
    anything.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._seqs: dict[SeqId, _SequenceBlocks] = {}

    # Occupancy.

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, including freed ones still kept for prefix reuse."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1] (vLLM's kv_cache_usage)."""
        return self.num_used_blocks / self.pool.num_blocks

    # Per-sequence views.

    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id: SeqId) -> int:
        return len(self._get(seq_id).token_ids)

    def block_table(self, seq_id: SeqId, start: int = 0) -> list[int]:
        """Physical block of each of the sequence's logical blocks from `start` (a copy)."""
        return self._get(seq_id).block_table[start:]

    # Allocate: a new sequence's prompt.

    def can_allocate(self, token_ids: Sequence[int], namespace: Namespace = None) -> bool:
        """Whether `allocate` of this prompt would succeed, counting prefix-cache hits."""
        _, cached_blocks = self._match_prefix(token_ids, namespace)
        return self._num_blocks_to_claim(len(token_ids), cached_blocks) <= self.num_free_blocks

    def allocate(self, seq_id: SeqId, token_ids: Sequence[int], namespace: Namespace = None) -> int:
        """Gives a new sequence blocks for its prompt; returns num_cached_tokens.

        num_cached_tokens is the length of the longest cached prefix of full blocks the
        sequence reuses, a multiple of block_size. It is always below len(token_ids): the
        last prompt token is computed so that the model produces its logits.
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq {seq_id!r} is already allocated")
        token_ids = [int(t) for t in token_ids]
        block_hashes, cached_blocks = self._match_prefix(token_ids, namespace)
        num_to_claim = self._num_blocks_to_claim(len(token_ids), cached_blocks)
        if num_to_claim > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"seq {seq_id!r} needs {num_to_claim} free blocks, {self.num_free_blocks} free"
            )
        # Take back the hits before allocating, so that eviction cannot pick them.
        for block_id in cached_blocks:
            self.pool.incref(block_id)
        num_blocks = _cdiv(len(token_ids), self.block_size)
        block_table = cached_blocks + [
            self.pool.allocate() for _ in range(num_blocks - len(cached_blocks))
        ]
        self._seqs[seq_id] = _SequenceBlocks(
            token_ids, block_table, block_hashes, namespace, len(cached_blocks)
        )
        return len(cached_blocks) * self.block_size

    def commit(self, seq_id: SeqId, num_computed_tokens: int) -> None:
        """Records that the first `num_computed_tokens` have K/V on device; their full
        blocks become prefix-cache hits for later requests."""
        seq = self._get(seq_id)
        if not 0 <= num_computed_tokens <= len(seq.token_ids):
            raise ValueError(
                f"seq {seq_id!r}: num_computed_tokens {num_computed_tokens} outside "
                f"[0, {len(seq.token_ids)}]"
            )
        num_full = min(num_computed_tokens // self.block_size, len(seq.block_hashes))
        for i in range(seq.num_committed_blocks, num_full):
            self.pool.cache(seq.block_table[i], seq.block_hashes[i])
        seq.num_committed_blocks = max(seq.num_committed_blocks, num_full)

    # Append: one decoded token.

    def can_append(self, seq_id: SeqId) -> bool:
        """Whether `append` would succeed: it needs a block at a boundary or for a copy."""
        return self._num_blocks_for_append(self._get(seq_id)) <= self.num_free_blocks

    def append(self, seq_id: SeqId, token_id: int) -> list[BlockCopy]:
        """Adds one token; returns the copies to run on device before writing its K/V.

        A new block is taken only when the token starts one. If the token lands in a
        partial block that other sequences share, the sequence gets its own copy first.
        """
        seq = self._get(seq_id)
        if self._num_blocks_for_append(seq) > self.num_free_blocks:
            raise NoFreeBlocksError(f"seq {seq_id!r} needs a block to append, none is free")
        copies = []
        if len(seq.token_ids) % self.block_size == 0:
            seq.block_table.append(self.pool.allocate())
        elif self.pool.ref_count(seq.block_table[-1]) > 1:
            src_block = seq.block_table[-1]
            dst_block = self.pool.allocate()
            self.pool.decref(src_block)
            seq.block_table[-1] = dst_block
            copies.append(BlockCopy(src_block, dst_block))
        seq.token_ids.append(int(token_id))
        if self.enable_prefix_caching and len(seq.token_ids) % self.block_size == 0:
            parent_hash = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = hash_block_tokens(
                parent_hash, seq.token_ids[-self.block_size :], seq.namespace
            )
            seq.block_hashes.append(block_hash)
        return copies

    # Reserve and record: the engine's decode path, where tokens are sampled on device.

    def can_reserve(self, seq_id: SeqId, start: int, end: int) -> bool:
        """Whether `reserve(seq_id, start, end)` would succeed."""
        return len(self._blocks_to_reserve(self._get(seq_id), start, end)) <= self.num_free_blocks

    def reserve(self, seq_id: SeqId, start: int, end: int) -> list[BlockCopy]:
        """Makes positions [start, end) writable before their tokens are known.

        The engine samples on device and runs several decode steps per call, so a block
        must exist (and be the sequence's own) before the token that fills it is seen on
        the host. New blocks extend the table; a shared block in the range (the partial
        last block of a forked prompt) is copied first. Returns the copies to run on device
        before the step. The token ids follow later through `record_tokens`.
        """
        seq = self._get(seq_id)
        needed = self._blocks_to_reserve(seq, start, end)
        if len(needed) > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"seq {seq_id!r} needs {len(needed)} blocks for positions [{start}, {end}), "
                f"{self.num_free_blocks} free"
            )
        copies = []
        for index in needed:
            if index < len(seq.block_table):
                src_block = seq.block_table[index]
                dst_block = self.pool.allocate()
                self.pool.decref(src_block)
                seq.block_table[index] = dst_block
                copies.append(BlockCopy(src_block, dst_block))
            else:
                seq.block_table.append(self.pool.allocate())
        return copies

    def record_tokens(self, seq_id: SeqId, token_ids: Sequence[int]) -> None:
        """Appends sampled tokens (their blocks reserved before) and keys the blocks they
        fill for the prefix cache; `commit` registers those blocks once computed."""
        seq = self._get(seq_id)
        for token_id in token_ids:
            seq.token_ids.append(int(token_id))
            if self.enable_prefix_caching and len(seq.token_ids) % self.block_size == 0:
                parent_hash = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes.append(
                    hash_block_tokens(parent_hash, seq.token_ids[-self.block_size :], seq.namespace)
                )

    # Fork and free.

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Starts `child_id` as a copy of `parent_id` that shares all of its blocks.

        Needs no free block: copies happen lazily, on the first append into a shared
        partial block.
        """
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"seq {child_id!r} is already allocated")
        for block_id in parent.block_table:
            self.pool.incref(block_id)
        self._seqs[child_id] = _SequenceBlocks(
            list(parent.token_ids),
            list(parent.block_table),
            list(parent.block_hashes),
            parent.namespace,
            parent.num_committed_blocks,
        )

    def free(self, seq_id: SeqId) -> None:
        """Releases a sequence's blocks; cached ones stay reusable until evicted."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            raise ValueError(f"seq {seq_id!r} is not allocated")
        # Tail first: a prefix's last blocks are the least likely to be shared again,
        # so they go to the front of the eviction order (as in vLLM).
        for block_id in reversed(seq.block_table):
            self.pool.decref(block_id)

    def reset_prefix_cache(self) -> None:
        """Forgets all cached prefixes, e.g. after a weight update makes their KV stale.

        Refuses while sequences are live: their later full blocks would be registered
        with KV computed under the old weights.
        """
        if self._seqs:
            raise ValueError(f"cannot reset the prefix cache with {len(self._seqs)} live seqs")
        self.pool.reset_cache()

    # Helpers.

    def _get(self, seq_id: SeqId) -> _SequenceBlocks:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise ValueError(f"seq {seq_id!r} is not allocated")
        return seq

    def _match_prefix(
        self, token_ids: Sequence[int], namespace: Namespace
    ) -> tuple[list[BlockHash], list[int]]:
        """Full-block hashes of the prompt and the cached blocks of its longest hit."""
        if len(token_ids) == 0:
            raise ValueError("a prompt needs at least one token")
        if not self.enable_prefix_caching:
            return [], []
        block_hashes = hash_full_blocks(token_ids, self.block_size, namespace)
        # At most (n - 1) // block_size blocks, so the last token is always computed.
        max_cached_blocks = (len(token_ids) - 1) // self.block_size
        cached_blocks = []
        for block_hash in block_hashes[:max_cached_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            cached_blocks.append(block_id)
        return block_hashes, cached_blocks

    def _num_blocks_to_claim(self, num_tokens: int, cached_blocks: list[int]) -> int:
        """Free blocks an allocation consumes: new ones plus hits that are currently free."""
        num_new = _cdiv(num_tokens, self.block_size) - len(cached_blocks)
        return num_new + sum(self.pool.ref_count(b) == 0 for b in cached_blocks)

    def _blocks_to_reserve(self, seq: _SequenceBlocks, start: int, end: int) -> list[int]:
        """Logical blocks that positions [start, end) need: missing or shared ones."""
        if not 0 <= start <= end:
            raise ValueError(f"cannot reserve positions [{start}, {end})")
        if end == start:
            return []
        return [
            index
            for index in range(start // self.block_size, _cdiv(end, self.block_size))
            if index >= len(seq.block_table) or self.pool.ref_count(seq.block_table[index]) > 1
        ]

    def _num_blocks_for_append(self, seq: _SequenceBlocks) -> int:
        if len(seq.token_ids) % self.block_size == 0:
            return 1
        return int(self.pool.ref_count(seq.block_table[-1]) > 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
