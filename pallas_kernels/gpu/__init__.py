"""Ragged paged attention for Hopper GPUs (Mosaic GPU): the kernel, its tile metadata and
its block-size table."""

from tandem.pallas_kernels.gpu.kernel import ragged_paged_attention_gpu, unsupported_reason
from tandem.pallas_kernels.gpu.tiles import merge_splits, split_blocks, tile_metadata
from tandem.pallas_kernels.gpu.tuning import BlockConfig, block_config, num_splits

__all__ = [
    "BlockConfig",
    "block_config",
    "merge_splits",
    "num_splits",
    "ragged_paged_attention_gpu",
    "split_blocks",
    "tile_metadata",
    "unsupported_reason",
]
