"""Attention kernels over the paged KV cache: one API, a kernel per backend, a JAX reference."""

from tandem.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from tandem.pallas_kernels.reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]
