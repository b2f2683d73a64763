"""The chained hash that names a full block of tokens for prefix caching.

A block's KV depends on every token before it, not only on its own tokens, so its key
chains in the parent block's hash (vLLM's automatic prefix caching). The namespace (a
LoRA adapter id, a policy version) goes into every block's key so that KV computed under
different weights is never shared.

The hash is blake2b over fixed-width bytes, not Python's `hash()`: that one is salted per
process, and keys must agree across processes (a disaggregated prefill worker and its
decode worker, or a restart).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

BlockHash = bytes
"""A 16-byte blake2b digest."""

Namespace = str | int | None
"""What separates caches: None for the base model, or an adapter or policy-version id."""

_DIGEST_SIZE = 16
_NO_PARENT = b"\x00" * _DIGEST_SIZE


def hash_block_tokens(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    namespace: Namespace = None,
) -> BlockHash:
    """Key of a full block: its parent's key, the namespace and the block's token ids.

    `parent_hash` is None for a sequence's first block. The namespace is length-prefixed
    and typed (`repr`), so "1" and 1 differ and no namespace can run into the token bytes.
    """
    if not isinstance(namespace, str | int | type(None)):
        raise TypeError(f"namespace must be str, int or None, got {type(namespace).__name__}")
    encoded_namespace = repr(namespace).encode()
    h = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    h.update(_NO_PARENT if parent_hash is None else parent_hash)
    h.update(len(encoded_namespace).to_bytes(4, "little"))
    h.update(encoded_namespace)
    h.update(np.asarray(token_ids, dtype="<i8").tobytes())
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, namespace: Namespace = None
) -> list[BlockHash]:
    """Chained keys of every full block of `token_ids`; a trailing partial block has none."""
    block_hashes: list[BlockHash] = []
    parent_hash = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(
            parent_hash, token_ids[start : start + block_size], namespace
        )
        block_hashes.append(parent_hash)
    return block_hashes
