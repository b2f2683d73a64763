"""The serving forward (paged KV, chunked prefill, then decode) computes the training
forward's logits on the same tokens, for every family's switches."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paged_harness import SeqChunk, build_batch, greedy_generate

from tandem.model import ModelConfig, Transformer
from tandem.model.kv_cache import write_kv

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
FAMILIES = {
    "llama3": ModelConfig(
        **BASE,
        rope_type="llama3",
        rope_factor=8.0,
        rope_theta=500000.0,
        rope_original_max_position=16,
    ),
    "mistral_window": ModelConfig(**BASE, model_type="mistral", sliding_window=6),
    "qwen2_bias": ModelConfig(**BASE, model_type="qwen2"),
    "qwen3_qk_norm_tied": ModelConfig(**BASE, model_type="qwen3", tie_word_embeddings=True),
    "mha": ModelConfig(**{**BASE, "num_kv_heads": 4}),
}


def _randomize(model):
    """Non-zero biases and non-unit norms, so every switch changes the logits."""
    state = nnx.state(model, nnx.Param)
    rs = np.random.RandomState(1)
    state = nnx.from_flat_state(
        {
            k: v.replace(jnp.asarray(v[...] + 0.05 * rs.standard_normal(v.shape), v.dtype))
            for k, v in nnx.to_flat_state(state)
        }
    )
    nnx.update(model, state)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("page_size,token_budget", [(4, 5), (16, 64)])
def test_prefill_then_decode_matches_training_forward(family, page_size, token_budget):
    model = _randomize(Transformer(FAMILIES[family], rngs=nnx.Rngs(0)))
    rs = np.random.RandomState(0)
    # lengths 1, an exact page multiple, and ragged ones; 32 decoded tokens each
    prompts = [list(rs.randint(0, 96, n)) for n in (1, 8, 13, 21)]
    outs, logits = greedy_generate(
        model, prompts, 32, page_size=page_size, token_budget=token_budget, return_logits=True
    )
    for prompt, out, got in zip(prompts, outs, logits):
        assert len(out) == 32
        full = prompt + out
        want = np.asarray(model(jnp.asarray([full])))[0, :-1]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_build_batch_layout_by_hand():
    # seq 0: 2 cached tokens + 3 new on pages [7, 2] of size 4 -> slots 7*4+2, 7*4+3, 2*4+0
    # seq 1: 1 new token at position 0 on page [5] -> slot 20
    tokens, md = build_batch(
        [SeqChunk([1, 2, 3], 2, [7, 2]), SeqChunk([9], 0, [5])],
        4,
        num_tokens=8,
        num_seqs=4,
        pages_per_seq=2,
    )
    assert tokens.tolist() == [1, 2, 3, 9, 0, 0, 0, 0]
    assert md.positions.tolist()[:4] == [2, 3, 4, 0]
    assert md.slot_mapping.tolist() == [30, 31, 8, 20, -1, -1, -1, -1]
    assert md.kv_lens.tolist() == [5, 1, 0, 0]
    assert md.cu_q_lens.tolist() == [0, 3, 4, 4, 4]
    assert md.page_indices.tolist() == [[7, 2], [5, 0], [0, 0], [0, 0]]
    assert md.num_seqs.tolist() == [2]


def test_build_batch_rejects_overflow():
    with pytest.raises(ValueError, match="exceeds the bucket"):
        build_batch([SeqChunk([1] * 9, 0, [0, 1, 2])], 4, num_tokens=8, num_seqs=1, pages_per_seq=3)
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        build_batch([SeqChunk([1] * 9, 0, [0, 1])], 4, num_tokens=16, num_seqs=1, pages_per_seq=2)


def test_write_kv_interleaves_and_drops_padding():
    cache = jnp.zeros((2, 2, 4, 3))  # P=2, L=2, K=2, H=3
    k = jnp.ones((2, 2, 3))
    v = 2 * jnp.ones((2, 2, 3))
    out = np.asarray(write_kv(cache, k, v, jnp.array([3, -1])))
    assert out[1, 1, 0::2].tolist() == [[1.0] * 3] * 2  # slot 3 = page 1, offset 1: K even
    assert out[1, 1, 1::2].tolist() == [[2.0] * 3] * 2  # V odd
    assert np.count_nonzero(out) == 12  # the padding token (-1) wrote nothing
