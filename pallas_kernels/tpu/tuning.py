"""Block sizes for the TPU ragged paged attention kernel, as data.

A q block holds `num_queries_per_block` tokens, i.e. `num_queries_per_block * G` MXU rows
(the G q heads of one kv head are stacked under each token). A kv block holds
`num_pages_per_block` pages, fetched by one group of DMAs while the previous block is
being computed.

The table maps head_dim to target sizes in rows and tokens; `block_sizes` turns them into
counts for a given group size and page size. The values are starting points taken from
the shape of RPA v2's tuned table for TPU v6 (q blocks of 32 tokens at 12 q heads, i.e.
~128-384 rows; kv blocks of 512-2048 tokens); re-tune them on the target chip.
"""

from __future__ import annotations

import dataclasses

# Rows of a q block are tokens x G and fill MXU tiles; Mosaic tiles the second-minor axis
# by 8 rows (f32) and 16 (bf16), so q tokens per block stay a multiple of 16.
QUERY_TOKEN_ALIGN = 16
# Pages per kv block are unrolled into one DMA each and their indices live in scalar
# registers; RPA v2 caps pages per sequence at 16 for the same reason.
MAX_PAGES_PER_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Target:
    """Target sizes for one head_dim."""

    q_rows: int
    """MXU rows per q block (q tokens x G); a q block spans at least QUERY_TOKEN_ALIGN tokens."""
    kv_tokens: int
    """Keys per kv block (pages x page size); bounds VMEM for the two K and two V buffers."""


TARGETS: dict[int, Target] = {
    64: Target(q_rows=256, kv_tokens=1024),
    128: Target(q_rows=256, kv_tokens=512),
    256: Target(q_rows=128, kv_tokens=256),
}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    num_queries_per_block: int
    """q tokens per grid step (a multiple of QUERY_TOKEN_ALIGN)."""
    num_pages_per_block: int
    """kv pages per DMA step."""


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_sizes(
    *, head_dim: int, page_size: int, group: int, num_tokens: int, pages_per_seq: int
) -> BlockSizes:
    """Block sizes for a call; never larger than the call needs."""
    target = TARGETS.get(head_dim) or TARGETS[min(TARGETS, key=lambda h: abs(h - head_dim))]
    bq = max(QUERY_TOKEN_ALIGN, target.q_rows // group // QUERY_TOKEN_ALIGN * QUERY_TOKEN_ALIGN)
    bq = min(bq, _round_up(num_tokens, QUERY_TOKEN_ALIGN))
    num_pages = max(1, target.kv_tokens // page_size)
    num_pages = min(num_pages, MAX_PAGES_PER_BLOCK, pages_per_seq)
    return BlockSizes(num_queries_per_block=bq, num_pages_per_block=num_pages)
