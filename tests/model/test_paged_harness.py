"""The model on BlockManager pages: prefix caching and forked groups change which pages are
read, never the logits."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from paged_harness import PagedRunner

from tandem.model import ModelConfig, Transformer

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
PAGE = 4


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


def training_logits(model, tokens):  # f32[len(tokens), V]
    return np.asarray(model(jnp.asarray([tokens])))[0]


def test_shared_prefix_reuses_cached_blocks_with_equal_logits(model):
    rs = np.random.RandomState(0)
    prefix = list(rs.randint(0, 64, 3 * PAGE))  # exactly 3 full blocks
    a = prefix + [1, 2, 3, 4, 5]
    b = prefix + [9, 8]
    runner = PagedRunner(model, num_pages=16, page_size=PAGE, max_seq_len=32)
    cached_a, logits_a = runner.prefill("a", a)
    cached_b, logits_b = runner.prefill("b", b)
    assert cached_a == 0
    assert cached_b == 3 * PAGE
    # b's first three blocks are a's, held by both
    assert runner.blocks.block_table("b")[:3] == runner.blocks.block_table("a")[:3]
    assert all(runner.blocks.pool.ref_count(p) == 2 for p in runner.blocks.block_table("a")[:3])
    # b computed only its 2 new tokens, and they equal an uncached run
    assert logits_b.shape == (2, 64)
    np.testing.assert_allclose(logits_b, training_logits(model, b)[-2:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits_a, training_logits(model, a), atol=1e-4, rtol=0)
    uncached = PagedRunner(
        model, num_pages=16, page_size=PAGE, max_seq_len=32, enable_prefix_caching=False
    )
    _, logits_b_uncached = uncached.prefill("b", b)
    np.testing.assert_allclose(logits_b, logits_b_uncached[-2:], atol=1e-5, rtol=0)
    # decoding on top of the shared blocks stays exact
    out = runner.decode({"b": 7})["b"]
    np.testing.assert_allclose(out, training_logits(model, b + [7])[-1], atol=1e-4, rtol=0)


def test_forked_group_of_eight_holds_the_prompt_once(model):
    prompt = list(np.random.RandomState(1).randint(0, 64, 2 * PAGE + 2))  # 2 full + 2 tokens
    runner = PagedRunner(model, num_pages=32, page_size=PAGE, max_seq_len=24)
    runner.prefill(0, prompt)
    for child in range(1, 8):
        runner.fork(0, child)
    tables = [runner.blocks.block_table(s) for s in range(8)]
    full_blocks = tables[0][:2]
    assert all(t[:2] == full_blocks for t in tables)
    assert all(runner.blocks.pool.ref_count(p) == 8 for p in full_blocks)
    used_before = runner.blocks.num_used_blocks
    assert used_before == 3  # 2 full prompt blocks + 1 shared partial block, for all 8
    # each member appends its own token: the shared partial block is copied on write
    steps = [{s: 10 + s for s in range(8)}, {s: 20 + s for s in range(8)}]
    for step in steps:
        got = runner.decode(step)
    for s in range(8):
        tokens = prompt + [10 + s, 20 + s]
        np.testing.assert_allclose(got[s], training_logits(model, tokens)[-1], atol=1e-4, rtol=0)
    assert all(runner.blocks.pool.ref_count(p) == 8 for p in full_blocks)
    for s in range(8):
        runner.free(s)
    assert runner.blocks.num_used_blocks == 0


def test_prompt_longer_than_max_seq_len_is_refused(model):
    runner = PagedRunner(model, num_pages=4, page_size=PAGE, max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        runner.prefill("x", list(range(9)))
    assert runner.blocks.num_used_blocks == 0


def test_one_step_prefills_several_prompts_and_decodes_together(model):
    """A mixed batch: two prompts' chunks and a running decode in one model step."""
    from paged_harness import SeqChunk

    runner = PagedRunner(model, num_pages=32, page_size=PAGE, max_seq_len=32)
    rs = np.random.RandomState(2)
    a, b, c = (list(rs.randint(0, 64, n)) for n in (5, 9, 13))
    _, logits_a = runner.prefill("a", a)  # "a" is decoding from here on
    next_a = int(np.argmax(logits_a[-1]))
    runner.blocks.append("a", next_a)
    for seq_id, tokens in (("b", b), ("c", c)):
        runner.blocks.allocate(seq_id, tokens)
    table = runner.blocks.block_table
    # b's first 6 tokens and c's whole prompt, beside a's decode token
    logits = runner._run(
        [
            SeqChunk([next_a], len(a), table("a")),
            SeqChunk(b[:6], 0, table("b")),
            SeqChunk(c, 0, table("c")),
        ]
    )
    np.testing.assert_allclose(
        logits[0], training_logits(model, a + [next_a])[-1], atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(logits[1:7], training_logits(model, b)[:6], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[7:], training_logits(model, c), atol=1e-4, rtol=0)
    # the rest of b in the next step reads the 6 tokens the mixed step wrote
    rest = runner._run([SeqChunk(b[6:], 6, table("b"))])
    np.testing.assert_allclose(rest, training_logits(model, b)[6:], atol=1e-4, rtol=0)
