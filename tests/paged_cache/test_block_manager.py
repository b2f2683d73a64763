"""Hand-computed cases for BlockManager; block_size is 4 unless a test says otherwise."""

import subprocess
import sys

import pytest

from tandem.paged_cache import (
    BlockCopy,
    BlockManager,
    NoFreeBlocksError,
    hash_block_tokens,
    hash_full_blocks,
)

BS = 4


# The engine commits every token once its step has run; these helpers do the same, so a
# test reads as "allocate and compute" unless it calls the manager directly.
def alloc(bm, seq_id, token_ids, namespace=None):
    num_cached = bm.allocate(seq_id, token_ids, namespace)
    bm.commit(seq_id, len(token_ids))
    return num_cached


def app(bm, seq_id, token_id):
    copies = bm.append(seq_id, token_id)
    bm.commit(seq_id, bm.num_tokens(seq_id))
    return copies


def test_paged_cache_never_imports_jax():
    code = (
        "import sys, tandem.paged_cache; "
        "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_append_takes_a_block_only_at_a_boundary():
    bm = BlockManager(num_blocks=8, block_size=BS)
    # 3 tokens -> ceil(3 / 4) = 1 block.
    assert alloc(bm, "a", [1, 2, 3]) == 0
    assert (bm.num_used_blocks, bm.num_free_blocks) == (1, 7)
    # Token 4 fills block 0: no new block.
    assert bm.can_append("a")
    assert app(bm, "a", 4) == []
    assert (bm.num_tokens("a"), len(bm.block_table("a")), bm.num_used_blocks) == (4, 1, 1)
    # Token 5 starts block 1.
    assert app(bm, "a", 5) == []
    assert (len(bm.block_table("a")), bm.num_used_blocks) == (2, 2)
    # Tokens 6..8 stay in block 1; token 9 starts block 2.
    for t in (6, 7, 8):
        app(bm, "a", t)
    assert bm.num_used_blocks == 2
    app(bm, "a", 9)
    assert (bm.num_tokens("a"), bm.num_used_blocks, bm.usage) == (9, 3, 3 / 8)


def test_a_prompt_that_fills_its_blocks_exactly_takes_no_extra_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc(bm, "a", list(range(8)))  # 8 / 4 = 2 blocks, both full
    assert bm.num_used_blocks == 2
    app(bm, "a", 8)  # token 9 starts block 3
    assert bm.num_used_blocks == 3


def test_a_sequence_grows_into_a_new_block_at_each_block_boundary():
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc(bm, "x", [0, 0])  # takes block 0
    alloc(bm, "a", list(range(6)))  # takes blocks 1, 2
    bm.free("x")
    app(bm, "a", 6)
    app(bm, "a", 7)
    assert bm.block_table("a") == [1, 2]  # positions 6, 7 fill block 2
    app(bm, "a", 8)  # position 8 starts a third block
    table = bm.block_table("a")
    assert table[:2] == [1, 2] and len(table) == 3 and table[2] not in (1, 2)
    assert bm.block_table("a", 2) == table[2:]


def test_two_requests_sharing_a_three_block_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    # a: 12 + 2 = 14 tokens -> 4 blocks; nothing cached yet.
    assert alloc(bm, "a", prefix + [1, 2]) == 0
    # b: same 12 tokens + 3 others -> hits 3 blocks, needs 1 new.
    assert bm.can_allocate(prefix + [7, 8, 9])
    assert alloc(bm, "b", prefix + [7, 8, 9]) == 3 * BS
    a, b = bm.block_table("a"), bm.block_table("b")
    assert b[:3] == a[:3] and b[3] != a[3]
    assert [bm.pool.ref_count(block) for block in a] == [2, 2, 2, 1]
    assert bm.num_used_blocks == 4 + 1


def test_the_whole_prompt_is_never_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(12))
    alloc(bm, "a", prompt)
    # Same 12 tokens: at most (12 - 1) // 4 = 2 blocks may hit, so the last token is computed.
    assert alloc(bm, "b", prompt) == 2 * BS
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2]
    assert bm.block_table("b")[2] != bm.block_table("a")[2]


def test_decode_appends_register_full_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    alloc(bm, "a", [5, 6, 7])
    app(bm, "a", 8)  # block 0 is now full: [5, 6, 7, 8]
    assert alloc(bm, "b", [5, 6, 7, 8, 9]) == BS
    assert bm.block_table("b")[0] == bm.block_table("a")[0]


def test_a_forked_group_of_eight_shares_the_prompt_and_copies_the_partial_block():
    bm = BlockManager(num_blocks=32, block_size=BS)
    # 10 tokens -> blocks [full, full, partial with 2 tokens].
    alloc(bm, "p", list(range(10)))
    children = [f"p#{i}" for i in range(1, 8)]
    for child in children:
        bm.fork("p", child)
    full0, full1, partial = bm.block_table("p")
    assert bm.num_used_blocks == 3  # the group holds the prompt once
    assert [bm.pool.ref_count(b) for b in (full0, full1, partial)] == [8, 8, 8]
    # Each child writing position 10 copies the shared partial block first.
    dst_blocks = []
    for i, child in enumerate(children):
        copies = app(bm, child, 1000 + i)
        assert len(copies) == 1 and copies[0].src_block == partial
        dst_blocks.append(copies[0].dst_block)
        assert bm.block_table(child) == [full0, full1, copies[0].dst_block]
    assert len(set(dst_blocks)) == 7 and partial not in dst_blocks
    # The parent is now the partial block's only holder and writes in place.
    assert bm.pool.ref_count(partial) == 1
    assert app(bm, "p", 999) == []
    assert bm.block_table("p") == [full0, full1, partial]
    assert [bm.pool.ref_count(b) for b in (full0, full1)] == [8, 8]
    assert bm.num_used_blocks == 3 + 7


def test_a_fork_at_a_block_boundary_copies_nothing():
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc(bm, "p", list(range(8)))  # 2 full blocks
    bm.fork("p", "c")
    assert app(bm, "c", 8) == []  # starts a new block of its own
    assert app(bm, "p", 9) == []
    assert bm.block_table("c")[:2] == bm.block_table("p")[:2]
    assert bm.block_table("c")[2] != bm.block_table("p")[2]


def test_the_parent_copies_too_when_it_writes_first():
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc(bm, "p", [1, 2])
    bm.fork("p", "c")
    (shared,) = bm.block_table("p")
    copies = app(bm, "p", 3)
    assert copies == [BlockCopy(src_block=shared, dst_block=bm.block_table("p")[0])]
    assert bm.block_table("c") == [shared] and app(bm, "c", 4) == []


def test_a_shared_partial_block_needs_a_free_block_to_append():
    bm = BlockManager(num_blocks=1, block_size=BS)
    alloc(bm, "p", [1, 2])
    bm.fork("p", "c")
    assert not bm.can_append("p")
    with pytest.raises(NoFreeBlocksError, match="'p'"):
        app(bm, "p", 3)
    bm.free("c")
    assert bm.can_append("p") and app(bm, "p", 3) == []


def test_freed_cached_blocks_are_reused_by_a_later_identical_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(13))  # 3 full blocks + 1 token
    alloc(bm, "a", prompt)
    table_a = bm.block_table("a")
    bm.free("a")
    assert (bm.num_free_blocks, bm.num_used_blocks) == (8, 0)
    assert alloc(bm, "b", prompt) == 3 * BS
    assert bm.block_table("b")[:3] == table_a[:3]


def test_eviction_takes_empty_blocks_first_then_the_least_recently_freed():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = [1] * 8, [2] * 8  # 2 full blocks each, both cached
    alloc(bm, "a", a)
    alloc(bm, "b", b)
    a0, a1 = bm.block_table("a")
    b0, b1 = bm.block_table("b")
    bm.free("a")
    bm.free("b")
    # Free order: 2 empty blocks, then a1, a0, b1, b0 (each sequence's tail first).
    assert bm.pool.free_block_ids()[2:] == [a1, a0, b1, b0]
    # 12 new tokens -> 3 blocks: both empty ones, then a1 is evicted.
    alloc(bm, "c", [3] * 12)
    assert a1 in bm.block_table("c") and a0 not in bm.block_table("c")
    keys = hash_full_blocks(a, BS) + hash_full_blocks(b, BS)
    assert [bm.pool.lookup(h) for h in keys] == [a0, None, b0, b1]
    # 8 + 1 tokens -> 3 blocks: b0 and b1 hit, the new one evicts a0, the next oldest.
    assert alloc(bm, "b2", b + [0]) == 2 * BS
    assert bm.block_table("b2") == [b0, b1, a0]
    assert [bm.pool.lookup(h) for h in keys] == [None, None, b0, b1]


def test_can_allocate_counts_free_cached_hits_as_taken():
    bm = BlockManager(num_blocks=3, block_size=BS)
    alloc(bm, "a", list(range(8)))
    bm.free("a")  # 3 free: 1 empty, 2 cached
    # 8 + 1 tokens -> 3 blocks: 2 hits (both free, so both are taken) + 1 new = 3 <= 3.
    assert bm.can_allocate(list(range(9)))
    # 12 + 1 tokens -> 4 blocks: 2 hits + 2 new = 4 > 3.
    assert not bm.can_allocate(list(range(13)))
    with pytest.raises(NoFreeBlocksError, match="'z' needs 4"):
        alloc(bm, "z", list(range(13)))
    assert bm.num_free_blocks == 3  # a failed allocate changes nothing
    assert alloc(bm, "b", list(range(9))) == 2 * BS


def test_namespaces_separate_caches():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(9))
    assert alloc(bm, "base", prompt) == 0
    assert alloc(bm, "lora1", prompt, namespace="lora-1") == 0
    assert alloc(bm, "lora2", prompt, namespace="lora-2") == 0
    assert alloc(bm, "lora1-again", prompt, namespace="lora-1") == 2 * BS
    assert bm.block_table("lora1-again")[:2] == bm.block_table("lora1")[:2]
    assert len({bm.block_table(s)[0] for s in ("base", "lora1", "lora2")}) == 3
    # A forked child keeps its parent's namespace for the blocks it fills.
    bm.fork("lora1", "lora1-child")
    for t in (9, 10, 11):
        app(bm, "lora1-child", t)
    assert alloc(bm, "lora1-long", list(range(13)), namespace="lora-1") == 3 * BS
    assert alloc(bm, "base-long", list(range(13))) == 2 * BS


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    assert alloc(bm, "a", prompt) == 0
    assert alloc(bm, "b", prompt) == 0
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    assert alloc(bm, "c", prompt) == 0
    assert bm.pool.cached_blocks() == {}


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    alloc(bm, "a", list(range(9)))
    with pytest.raises(ValueError, match="1 live"):
        bm.reset_prefix_cache()
    bm.free("a")
    bm.reset_prefix_cache()
    assert alloc(bm, "b", list(range(9))) == 0
    assert bm.num_free_blocks == 8 - 3


def test_errors_name_the_sequence():
    bm = BlockManager(num_blocks=2, block_size=BS)
    alloc(bm, "a", [1])
    with pytest.raises(ValueError, match="'a' is already allocated"):
        alloc(bm, "a", [1])
    with pytest.raises(ValueError, match="'a' is already allocated"):
        bm.fork("a", "a")
    with pytest.raises(ValueError, match="'nope' is not allocated"):
        app(bm, "nope", 1)
    with pytest.raises(ValueError, match="'nope' is not allocated"):
        bm.free("nope")
    with pytest.raises(ValueError, match="at least one token"):
        alloc(bm, "empty", [])
    with pytest.raises(NoFreeBlocksError, match="'big' needs 3"):
        alloc(bm, "big", list(range(12)))
    for t in range(2, 9):
        app(bm, "a", t)
    assert not bm.can_append("a")  # 8 tokens fill both blocks
    with pytest.raises(NoFreeBlocksError, match="'a'"):
        app(bm, "a", 9)
    assert bm.num_tokens("a") == 8  # a failed append changes nothing
    with pytest.raises(ValueError, match="positive"):
        BlockManager(num_blocks=0, block_size=BS)
    with pytest.raises(ValueError, match="positive"):
        BlockManager(num_blocks=4, block_size=0)


def test_block_hash_is_stable_and_chained():
    # Pinned: keys must agree across processes and restarts, unlike Python's hash().
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first.hex() == "06ec1d89c1ec565d1b69c3336852a22f"
    assert hash_block_tokens(first, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4], "1") != hash_block_tokens(None, [1, 2, 3, 4], 1)
    assert hash_full_blocks(list(range(1, 10)), BS) == [
        first,
        hash_block_tokens(first, [5, 6, 7, 8]),
    ]
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], namespace=1.5)


def test_uncomputed_blocks_are_not_prefix_hits():
    """A chunked prefill that has computed 1 of 3 full blocks offers only that block."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    prefix = list(range(100, 112))  # 3 full blocks
    assert bm.allocate("a", prefix + [1]) == 0
    bm.commit("a", 5)  # first chunk: 5 tokens computed -> block 0 is full and on device
    assert bm.allocate("b", prefix + [2]) == 1 * BS
    bm.commit("a", 13)
    assert bm.allocate("c", prefix + [3]) == 3 * BS
    with pytest.raises(ValueError, match="outside"):
        bm.commit("a", 14)
