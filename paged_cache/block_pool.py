"""The physical KV blocks: reference counts, the free list and the prefix-cache index.

The pool knows blocks, never sequences. A block is in one of three states:

- **used**: ref count > 0, in some sequence's block table;
- **free and empty**: ref count 0, no cached content; handed out first;
- **free and cached**: ref count 0, but its full-block hash is still registered, so a
  later request with the same prefix can take it back without recomputing. These are
  evicted least-recently-freed first, and only when no empty block is left.

Keeping empty and cached free blocks apart means an allocation never evicts reusable KV
while a block with nothing in it is available (vLLM keeps one queue and may do so).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from tandem.paged_cache.block_hash import BlockHash


class NoFreeBlocksError(RuntimeError):
    """An allocation needed more blocks than are free; check `can_allocate`/`can_append`."""


class BlockPool:
    """Ref-counted blocks `0..num_blocks-1` with an LRU of freed cached blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._empty: deque[int] = deque(range(num_blocks))
        # Insertion order is free order: the first key is the least recently freed.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[BlockHash, int] = {}
        self._block_to_hash: dict[int, BlockHash] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached or not: all of them can be handed out."""
        return len(self._empty) + len(self._evictable)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order `allocate` hands them out: empty ones, then LRU."""
        return [*self._empty, *self._evictable]

    def cached_blocks(self) -> dict[BlockHash, int]:
        """A copy of the prefix-cache index, hash -> block id (used and free blocks)."""
        return dict(self._hash_to_block)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash`'s content, or None on a miss. Does not claim it."""
        return self._hash_to_block.get(block_hash)

    def allocate(self) -> int:
        """Claims a block with ref count 1, evicting the oldest freed cached block if needed."""
        if self._empty:
            block_id = self._empty.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            # Its content is about to be overwritten: it must no longer answer lookups.
            del self._hash_to_block[self._block_to_hash.pop(block_id)]
        else:
            raise NoFreeBlocksError(f"all {self.num_blocks} blocks are in use")
        self._ref_counts[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """Adds a holder; a free block may only be taken back through a cache hit."""
        if self._ref_counts[block_id] == 0:
            if block_id not in self._evictable:
                raise ValueError(f"block {block_id} is free and uncached; use allocate()")
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def decref(self, block_id: int) -> None:
        """Drops a holder; at zero a cached block joins the LRU tail, others the empty list."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is already free")
        self._ref_counts[block_id] -= 1
        if self._ref_counts[block_id] == 0:
            if block_id in self._block_to_hash:
                self._evictable[block_id] = None
            else:
                self._empty.append(block_id)

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Registers a used, full block under `block_hash`; False if either is taken.

        The first block registered under a hash keeps it: a second block with the same
        content (two samples that happened to generate the same tokens) stays uncached
        and goes back to the empty list when freed.
        """
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only used blocks can be cached")
        if block_hash in self._hash_to_block or block_id in self._block_to_hash:
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    def reset_cache(self) -> None:
        """Forgets every cached hash; freed cached blocks become empty blocks."""
        self._empty.extend(self._evictable)
        self._evictable.clear()
        self._hash_to_block.clear()
        self._block_to_hash.clear()
