"""Block sizes and split-K planning for the Mosaic GPU kernel, as data. Plain Python.

A CTA owns one q tile of one kv head: ROWS = 64 wgmma rows holding `tokens_per_tile`
consecutive tokens of one sequence times the G q heads of that kv head (token-major:
row = i * G + g). It walks the tile's keys in blocks of `block_kv` tokens
(`block_kv / page_size` pages, one TMA per page for K and one for V), `num_stages` blocks
in flight.

Shared memory per CTA (bf16/f16, head_dim H):
    q tile 2 * 64*H*2 (plain landing buffer, reused to stage the output, + swizzled copy)
    + stages * 2 * block_kv * H * 2 (+ 256 B of log-sum-exps with split-K)
e.g. H=128: block 128 x 2 stages = 32 + 128 KiB (one CTA per SM); block 64 x 2 stages =
32 + 64 KiB (two CTAs per SM; the H200 has 228 KiB per SM, at most 227 KiB per block).

Split-K: decode batches have one tile per sequence and kv head; when that grid is too
small to fill the GPU, each tile's key range is cut into `num_splits` equal runs of
blocks, each a CTA of its own, and a small XLA pass merges the partial outputs by their
log-sum-exp. Splits are chosen from static shapes only (the grid must be static).
"""

from __future__ import annotations

import dataclasses

ROWS = 64  # wgmma M: one warpgroup's accumulator rows
NUM_SMS = 132  # H100/H200 SXM
# The split merge reads per-token log-sum-exps written by TMA in runs of G f32 values; a
# TMA store moves at least 16 bytes, 16-byte aligned, so split-K needs G % 4 == 0.
SPLIT_GROUP_ALIGN = 4
MAX_SPLITS = 16
# A split shorter than this many kv blocks spends more time filling its pipeline and
# writing f32 partials than streaming keys.
MIN_BLOCKS_PER_SPLIT = 4

SUPPORTED_HEAD_DIMS = (64, 128)
MIN_PAGE_SIZE, MAX_PAGE_SIZE = 8, 128
SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_kv: int
    """keys per pipeline stage: a multiple of the page size, 64 or 128."""
    num_stages: int
    """kv blocks in flight (>= 2)."""


# Measured on the H200 (page 16, 32 q / 8 kv heads, bf16; docs/benchmarks.md): 128-key
# blocks x 2 stages were the fastest or tied everywhere: B=64 at 4k context 270-283 us
# (64 x 2: 280-289, 64 x 4: 274-280), B=128 at 1k 158-169 us (64-key blocks: 165-172).
BLOCKS: dict[int, BlockConfig] = {
    64: BlockConfig(block_kv=128, num_stages=4),
    128: BlockConfig(block_kv=128, num_stages=2),
}


def tokens_per_tile(group: int) -> int:
    """Tokens of one sequence that share a q tile: floor(ROWS / G)."""
    return max(1, ROWS // group)


def block_config(head_dim: int, page_size: int) -> BlockConfig:
    """The table's block for this head_dim, never shorter than one page."""
    config = BLOCKS[head_dim]
    return dataclasses.replace(config, block_kv=max(config.block_kv, page_size))


def smem_bytes(head_dim: int, block: BlockConfig, *, itemsize: int, split: bool) -> int:
    """Shared memory one CTA allocates (barriers aside)."""
    q_tile = 2 * ROWS * head_dim * itemsize  # TMA landing buffer (later: out staging) + swizzled
    lse_stage = ROWS * 4 if split else 0
    kv = block.num_stages * 2 * block.block_kv * head_dim * itemsize
    return q_tile + lse_stage + kv


def num_slots(max_num_seqs: int, num_tokens: int, tokens_per_tile: int) -> int:
    """q tiles the grid reserves: sequence s (and the padding after the last one) gets
    1 + floor(end_s / tq) - floor(start_s / tq) >= ceil(q_len_s / tq) slots, so
    S + 1 + floor(T / tq) slots always suffice (see tiles.py)."""
    return max_num_seqs + 1 + num_tokens // tokens_per_tile


def num_splits(
    *,
    num_kv_heads: int,
    max_num_seqs: int,
    num_tokens: int,
    group: int,
    max_kv_blocks: int,
    num_sms: int = NUM_SMS,
) -> int:
    """Powers of two, doubled while the grid (kv heads x tile slots x splits) is under
    one wave (one CTA per SM: registers and SMEM allow no more) and every split would
    still get MIN_BLOCKS_PER_SPLIT blocks of a full-length sequence. 1 when G % 4 != 0
    (see SPLIT_GROUP_ALIGN). Measured at B=8, 4k context: 2 splits (one wave) 48 us,
    4 (two waves) 52 us, 8: 60 us."""
    if group % SPLIT_GROUP_ALIGN:
        return 1
    ctas = num_kv_heads * num_slots(max_num_seqs, num_tokens, tokens_per_tile(group))
    target = num_sms
    splits = 1
    while (
        ctas * splits < target
        and splits * 2 <= MAX_SPLITS
        and max_kv_blocks >= 2 * splits * MIN_BLOCKS_PER_SPLIT
    ):
        splits *= 2
    return splits
