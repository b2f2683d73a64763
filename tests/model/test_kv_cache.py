"""KV memory is sized from a byte budget and says so, before allocating, when it cannot fit."""

import jax.numpy as jnp
import pytest

from tandem.model import ModelConfig
from tandem.model.kv_cache import init_kv_cache, num_pages_for_budget, page_bytes

# Llama-3.2-1B's attention shape: 16 layers, 8 kv heads, head dim 64.
CFG = ModelConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
)


def test_page_bytes_by_hand():
    # 16 layers * 16 tokens * (2 * 8 heads) * 64 dims * 2 bytes = 524288 (32 KiB per token)
    assert page_bytes(CFG, 16) == 524288
    assert page_bytes(CFG, 16, jnp.float32) == 2 * 524288


def test_pages_from_a_byte_budget():
    assert num_pages_for_budget(CFG, 16, budget_bytes=10 * 524288 + 5) == 10
    # KV heads sharded over 4 devices: each device holds a quarter of every page
    assert num_pages_for_budget(CFG, 16, budget_bytes=10 * 524288, num_kv_shards=4) == 40


def test_too_small_a_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="KV cache does not fit.*holds 3 pages.*at least 8"):
        num_pages_for_budget(CFG, 16, budget_bytes=3 * 524288, min_pages=8)


def test_memory_fraction_needs_a_device_that_reports_memory():
    with pytest.raises(ValueError, match="reports no memory limit"):
        num_pages_for_budget(CFG, 16, memory_fraction=0.9)
    with pytest.raises(ValueError, match="exactly one"):
        num_pages_for_budget(CFG, 16)


def test_init_kv_cache_layout():
    cfg = CFG.replace(num_layers=2, num_kv_heads=2, head_dim=8)
    caches = init_kv_cache(cfg, num_pages=5, page_size=4)
    assert len(caches) == 2
    assert caches[0].shape == (5, 4, 4, 8) and caches[0].dtype == jnp.bfloat16
