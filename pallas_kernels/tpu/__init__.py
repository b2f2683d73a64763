"""Ragged paged attention for TPU (Mosaic TPU): the kernel and its block-size table."""

from tandem.pallas_kernels.tpu.kernel import ragged_paged_attention_tpu
from tandem.pallas_kernels.tpu.tuning import BlockSizes, block_sizes

__all__ = ["BlockSizes", "block_sizes", "ragged_paged_attention_tpu"]
