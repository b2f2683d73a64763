"""The engine's settings and its one request-level refusal."""

from __future__ import annotations

import dataclasses
import math

import jax

from tandem.model.config import ModelConfig
from tandem.model.kv_cache import KV_AXES, num_pages_for_budget
from tandem.model.sharding import named_sharding


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    """Tokens per KV page."""
    num_pages: int | None = None
    """KV pages; derived from kv_budget_bytes or device memory when None."""
    kv_budget_bytes: int | None = None
    """Bytes per device for KV pages (after the weights)."""
    kv_memory_fraction: float = 0.9
    """On devices that report memory: the fraction of it weights + KV may use."""
    max_model_len: int | None = None
    """Longest prompt + completion; the model's max_position_embeddings when None."""
    max_num_batched_tokens: int = 512
    """Token budget per step (decodes + prefill chunks); the largest token bucket."""
    max_num_seqs: int = 64
    """Sequences running at once: the slots of the device batch."""
    max_waiting: int = 4096
    """Requests waiting beyond this are refused with QueueFullError."""
    policy: str = "fcfs"
    """Scheduling: fcfs, priority or vtc."""
    client_weights: tuple[tuple[str, float], ...] = ()
    """VTC shares per client."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks shared with earlier prompts."""
    kv_dtype: str | None = None
    """KV page dtype; the model's when None."""
    seed: int = 0
    """Seeds the keys of requests without their own seed."""
    num_decode_steps: int = 8
    """Decode steps per call when no prompt work waits (one call, a while_loop on device;
    the host catches up after). 1 turns multi-step decoding off. Up to this many steps
    may run before a newly arrived request is admitted."""
    async_scheduling: bool = True
    """Plan and dispatch the next call before reading this one's results."""

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f"at least max_num_seqs ({self.max_num_seqs}): every running sequence decodes "
                "one token per step"
            )
        if self.num_decode_steps < 1:
            raise ValueError(
                f"EngineConfig.num_decode_steps must be at least 1, got {self.num_decode_steps}"
            )


def num_kv_pages(config: EngineConfig, cfg: ModelConfig, kv_dtype, mesh, max_model_len) -> int:
    """KV pages per `config`: from kv_budget_bytes, else from the device's free memory,
    else (a CPU, which reports none) room for every sequence at full length."""
    shards = 1
    if mesh is not None:
        # As the pages will be placed: kv heads that the rules cannot split replicate.
        page = (1, config.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        shards = page[2] // named_sharding(mesh, KV_AXES, page).shard_shape(page)[2]
    budget = dict(dtype=kv_dtype, num_kv_shards=shards, min_pages=config.max_num_seqs)
    if config.kv_budget_bytes is not None:
        return num_pages_for_budget(
            cfg, config.page_size, budget_bytes=config.kv_budget_bytes, **budget
        )
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return num_pages_for_budget(
            cfg, config.page_size, memory_fraction=config.kv_memory_fraction, **budget
        )
    return config.max_num_seqs * math.ceil(max_model_len / config.page_size)
