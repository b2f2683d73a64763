"""Random allocate/append/fork/free sequences keep the block manager's invariants.

The machine also simulates the device: a dict from block to the tokens written in it.
It writes each token to `slot(seq, position)` and runs every returned `BlockCopy`, so a
missed copy-on-write, a wrong cache hit or an evicted block still in the cache index
shows up as a sequence reading tokens that are not its own.

Tokens come from {0, 1, 2} and prompts from a few shared stems so that prefix hits,
identical blocks in different sequences and evictions are frequent.
"""

from collections import Counter

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tandem.paged_cache import BlockManager, NoFreeBlocksError, hash_full_blocks

SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

tokens = st.lists(st.integers(0, 2), min_size=0, max_size=6)
stems = st.sampled_from([[], [0, 1, 2, 0, 1, 2], [0, 0, 0, 0, 0, 0, 0, 0], [1, 2, 1]])


class BlockManagerMachine(RuleBasedStateMachine):
    enable_prefix_caching = True

    @initialize(num_blocks=st.integers(1, 12), block_size=st.integers(1, 4))
    def init(self, num_blocks, block_size):
        self.bm = BlockManager(num_blocks, block_size, self.enable_prefix_caching)
        self.block_size = block_size
        self.seqs: dict[int, list[int]] = {}  # the tokens each live sequence should hold
        self.namespaces: dict[int, str | None] = {}
        self.device: dict[int, dict[int, int]] = {}  # block -> offset -> token written
        self.content_by_hash: dict[bytes, tuple[int, ...]] = {}
        self.next_id = 0
        self.num_computed: dict[int, int] = {}  # tokens whose K/V the 'device' holds

    def _write(self, seq_id, position):
        block_index = self.bm.block_table(seq_id)[position // self.block_size]
        offset = position % self.block_size
        self.device.setdefault(block_index, {})[offset] = self.seqs[seq_id][position]

    def _record_hashes(self, seq_id):
        tokens = self.seqs[seq_id]
        block_hashes = hash_full_blocks(tokens, self.block_size, self.namespaces[seq_id])
        for i, block_hash in enumerate(block_hashes):
            block = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            assert self.content_by_hash.setdefault(block_hash, block) == block

    def _pick(self, index):
        return sorted(self.seqs)[index % len(self.seqs)]

    @rule(stem=stems, tail=tokens, namespace=st.sampled_from([None, None, "lora"]))
    def allocate(self, stem, tail, namespace):
        prompt = stem + tail
        if not prompt:
            return
        seq_id, self.next_id = self.next_id, self.next_id + 1
        if not self.bm.can_allocate(prompt, namespace):
            num_free = self.bm.num_free_blocks
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(seq_id, prompt, namespace)
            assert self.bm.num_free_blocks == num_free and seq_id not in self.bm
            return
        num_cached_tokens = self.bm.allocate(seq_id, prompt, namespace)
        assert num_cached_tokens % self.block_size == 0
        assert 0 <= num_cached_tokens < len(prompt)
        if not self.enable_prefix_caching:
            assert num_cached_tokens == 0
        self.seqs[seq_id] = list(prompt)
        self.namespaces[seq_id] = namespace
        # A hit must already hold the prompt's tokens; the rest is computed now.
        for position in range(num_cached_tokens):
            block = self.bm.block_table(seq_id)[position // self.block_size]
            assert self.device[block][position % self.block_size] == prompt[position]
        # The rest is computed later, in chunks (the `compute` rule), as chunked prefill does.
        self.num_computed[seq_id] = num_cached_tokens
        self._record_hashes(seq_id)

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 50), num_tokens=st.integers(1, 9))
    def compute(self, index, num_tokens):
        """A prefill chunk runs: its K/V land on device, then the engine commits them."""
        seq_id = self._pick(index)
        start = self.num_computed[seq_id]
        stop = min(len(self.seqs[seq_id]), start + num_tokens)
        for position in range(start, stop):
            self._write(seq_id, position)
        self.num_computed[seq_id] = stop
        self.bm.commit(seq_id, stop)

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 50), token=st.integers(0, 2))
    def append(self, index, token):
        seq_id = self._pick(index)
        if self.num_computed[seq_id] < len(self.seqs[seq_id]):
            return  # still prefilling: decode appends come after the prompt is computed
        if not self.bm.can_append(seq_id):
            with pytest.raises(NoFreeBlocksError):
                self.bm.append(seq_id, token)
            assert self.bm.num_tokens(seq_id) == len(self.seqs[seq_id])
            return
        old_table = self.bm.block_table(seq_id)
        copies = self.bm.append(seq_id, token)
        assert len(copies) <= 1
        for copy in copies:
            assert copy.src_block == old_table[-1] and copy.dst_block not in old_table
            self.device[copy.dst_block] = dict(self.device[copy.src_block])
        self.seqs[seq_id].append(token)
        self._write(seq_id, len(self.seqs[seq_id]) - 1)
        self.num_computed[seq_id] = len(self.seqs[seq_id])
        self.bm.commit(seq_id, len(self.seqs[seq_id]))
        self._record_hashes(seq_id)

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 50))
    def fork(self, index):
        parent_id = self._pick(index)
        if self.num_computed[parent_id] < len(self.seqs[parent_id]):
            return  # groups fork from a computed prompt
        child_id, self.next_id = self.next_id, self.next_id + 1
        num_free = self.bm.num_free_blocks
        self.bm.fork(parent_id, child_id)
        assert self.bm.num_free_blocks == num_free
        assert self.bm.block_table(child_id) == self.bm.block_table(parent_id)
        self.seqs[child_id] = list(self.seqs[parent_id])
        self.namespaces[child_id] = self.namespaces[parent_id]
        self.num_computed[child_id] = self.num_computed[parent_id]

    @precondition(lambda self: self.seqs)
    @rule(index=st.integers(0, 50))
    def free(self, index):
        seq_id = self._pick(index)
        self.bm.free(seq_id)
        del self.seqs[seq_id], self.namespaces[seq_id], self.num_computed[seq_id]

    @invariant()
    def counts_add_up(self):
        bm = self.bm
        assert bm.num_used_blocks + bm.num_free_blocks == bm.num_blocks
        assert bm.usage == bm.num_used_blocks / bm.num_blocks

    @invariant()
    def free_list_is_exactly_the_unreferenced_blocks(self):
        free = self.bm.pool.free_block_ids()
        assert len(free) == len(set(free)) == self.bm.num_free_blocks
        assert set(free) == {b for b in range(self.bm.num_blocks) if self.bm.pool.ref_count(b) == 0}

    @invariant()
    def ref_counts_equal_block_table_occurrences(self):
        occurrences = Counter(b for s in self.seqs for b in self.bm.block_table(s))
        for block in range(self.bm.num_blocks):
            assert self.bm.pool.ref_count(block) == occurrences[block]

    @invariant()
    def block_tables_cover_the_tokens(self):
        for seq_id, tokens in self.seqs.items():
            assert self.bm.num_tokens(seq_id) == len(tokens)
            num_blocks = -(-len(tokens) // self.block_size)
            assert len(self.bm.block_table(seq_id)) == num_blocks

    @invariant()
    def every_sequence_reads_its_own_tokens(self):
        for seq_id, tokens in self.seqs.items():
            for position, token in enumerate(tokens[: self.num_computed[seq_id]]):
                block = self.bm.block_table(seq_id)[position // self.block_size]
                assert self.device[block][position % self.block_size] == token

    @invariant()
    def cached_hashes_point_to_their_content(self):
        cached = self.bm.pool.cached_blocks()
        if not self.enable_prefix_caching:
            assert cached == {}
        for block_hash, block in cached.items():
            content = self.content_by_hash[block_hash]
            assert tuple(self.device[block][i] for i in range(self.block_size)) == content


class BlockManagerWithoutPrefixCachingMachine(BlockManagerMachine):
    enable_prefix_caching = False


TestBlockManagerWithPrefixCaching = BlockManagerMachine.TestCase
TestBlockManagerWithPrefixCaching.settings = SETTINGS
TestBlockManagerWithoutPrefixCaching = BlockManagerWithoutPrefixCachingMachine.TestCase
TestBlockManagerWithoutPrefixCaching.settings = SETTINGS
