"""Mosaic GPU (Hopper) kernels for ragged paged attention."""
