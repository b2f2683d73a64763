"""Host-side KV page bookkeeping: block tables, ref counts, copy-on-write, prefix caching.

Plain Python and numpy, never jax: the scheduler asks it "does this fit?" every step,
and its tests run without a device.
"""

from tandem.paged_cache.block_hash import BlockHash, Namespace, hash_block_tokens, hash_full_blocks
from tandem.paged_cache.block_manager import BlockCopy, BlockManager
from tandem.paged_cache.block_pool import BlockPool, NoFreeBlocksError

__all__ = [
    "BlockCopy",
    "BlockHash",
    "BlockManager",
    "BlockPool",
    "Namespace",
    "NoFreeBlocksError",
    "hash_block_tokens",
    "hash_full_blocks",
]
