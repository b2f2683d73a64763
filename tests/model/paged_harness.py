"""A reference harness for the paged serving forward, driven sequence by sequence.

Tests only: `model.forward_paged` over host-built metadata (`build_batch`), prefill in
chunks, decode one token at a time, with the `BlockManager` handing out pages. The
engine (serve/) is the production path; this harness checks the model's paged forward
against its training forward without the engine's scheduling in between.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.model.attention_metadata import AttentionMetadata
from tandem.model.kv_cache import KV_AXES, copy_blocks, init_kv_cache
from tandem.model.sharding import mesh_context, named_sharding
from tandem.model.transformer import Transformer
from tandem.paged_cache import BlockManager


def make_model_step(model: Transformer, mesh=None):
    """(step, params): `step(params, kv_caches, tokens, md)` -> (kv_caches, f32[T, V])."""
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def jitted(params, kv_caches, tokens, md):
        module = nnx.merge(graphdef, params)
        logits, kv_caches = module.forward_paged(tokens, kv_caches, md)
        return kv_caches, logits

    def step(params, kv_caches, tokens, md):
        with mesh_context(mesh):
            return jitted(params, kv_caches, tokens, md)

    return step, params


@dataclasses.dataclass(frozen=True)
class SeqChunk:
    """One sequence's share of a step: `token_ids` are new, starting at `start_pos`."""

    token_ids: list[int]
    start_pos: int  # tokens of this sequence already in the cache
    block_table: list[int]  # physical pages, enough for start_pos + len(token_ids)


def build_batch(
    chunks: list[SeqChunk], page_size: int, *, num_tokens: int, num_seqs: int, pages_per_seq: int
) -> tuple[np.ndarray, AttentionMetadata]:
    """Packs chunks into padded arrays: (tokens i32[T], metadata over T and S)."""
    total = sum(len(c.token_ids) for c in chunks)
    if total > num_tokens or len(chunks) > num_seqs:
        raise ValueError(
            f"batch of {total} tokens / {len(chunks)} seqs exceeds the bucket "
            f"({num_tokens} tokens, {num_seqs} seqs)"
        )
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, -1, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    page_indices = np.zeros((num_seqs, pages_per_seq), np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    t = 0
    for s, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start_pos + n
        if len(c.block_table) * page_size < end or len(c.block_table) > pages_per_seq:
            raise ValueError(
                f"sequence {s}: block table of {len(c.block_table)} pages cannot "
                f"hold {end} tokens within {pages_per_seq} pages of {page_size}"
            )
        pos = np.arange(c.start_pos, end)
        table = np.asarray(c.block_table, np.int32)
        tokens[t : t + n] = c.token_ids
        positions[t : t + n] = pos
        slot_mapping[t : t + n] = table[pos // page_size] * page_size + pos % page_size
        kv_lens[s] = end
        page_indices[s, : len(table)] = table
        t += n
        cu_q_lens[s + 1] = t
    cu_q_lens[len(chunks) + 1 :] = t
    md = AttentionMetadata(
        positions=positions,
        slot_mapping=slot_mapping,
        kv_lens=kv_lens,
        page_indices=page_indices,
        cu_q_lens=cu_q_lens,
        num_seqs=np.array([len(chunks)], np.int32),
    )
    return tokens, md


def bucket(n: int, minimum: int = 8) -> int:
    """The next power of two >= n: a handful of shapes, so few compilations."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


_copy_blocks = jax.jit(copy_blocks, donate_argnums=(0,))


class PagedRunner:
    def __init__(
        self,
        model: Transformer,
        *,
        num_pages: int,
        page_size: int = 16,
        max_seq_len: int | None = None,
        token_budget: int = 64,
        enable_prefix_caching: bool = True,
        mesh=None,
        kv_dtype=None,
    ):
        cfg = model.config
        self.model = model
        self.page_size = page_size
        self.token_budget = token_budget
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.pages_per_seq = math.ceil(self.max_seq_len / page_size)
        self.blocks = BlockManager(num_pages, page_size, enable_prefix_caching)
        self.step_fn, self.params = make_model_step(model, mesh)
        shape = (num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        sharding = named_sharding(mesh, KV_AXES, shape) if mesh is not None else None
        self.kv = init_kv_cache(
            cfg, num_pages, page_size, dtype=kv_dtype or model.embed.dtype, sharding=sharding
        )
        self.num_steps = 0

    def _run(self, chunks: list[SeqChunk]) -> np.ndarray:  # f32[sum of chunk lengths, V]
        num_tokens = sum(len(c.token_ids) for c in chunks)
        tokens, md = build_batch(
            chunks,
            self.page_size,
            num_tokens=bucket(num_tokens),
            num_seqs=bucket(len(chunks)),
            pages_per_seq=self.pages_per_seq,
        )
        self.kv, logits = self.step_fn(self.params, self.kv, jnp.asarray(tokens), md)
        self.num_steps += 1
        return np.asarray(logits[:num_tokens])

    def prefill(self, seq_id, token_ids: list[int], namespace=None) -> tuple[int, np.ndarray]:
        """Allocates pages and computes the prompt's uncached tokens in chunks of at most
        `token_budget`; returns (num_cached_tokens, f32[len(prompt) - num_cached, V])."""
        if len(token_ids) > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(token_ids)} tokens exceeds max_seq_len {self.max_seq_len}"
            )
        num_cached = self.blocks.allocate(seq_id, token_ids, namespace)
        table = self.blocks.block_table(seq_id)
        logits = []
        for start in range(num_cached, len(token_ids), self.token_budget):
            chunk = token_ids[start : start + self.token_budget]
            logits.append(self._run([SeqChunk(list(chunk), start, table)]))
            self.blocks.commit(seq_id, start + len(chunk))
        return num_cached, np.concatenate(logits)

    def fork(self, parent_id, child_id) -> None:
        self.blocks.fork(parent_id, child_id)

    def decode(self, next_tokens: dict) -> dict:
        """Appends one token to each sequence and computes it: {seq_id: f32[V]}."""
        copies = []
        for seq_id, token in next_tokens.items():
            if self.blocks.num_tokens(seq_id) + 1 > self.max_seq_len:
                raise ValueError(f"sequence {seq_id!r} would exceed max_seq_len {self.max_seq_len}")
            copies += self.blocks.append(seq_id, token)
        if copies:
            self.kv = _copy_blocks(self.kv, jnp.asarray(np.array(copies, np.int32)))
        chunks = [
            SeqChunk([token], self.blocks.num_tokens(seq_id) - 1, self.blocks.block_table(seq_id))
            for seq_id, token in next_tokens.items()
        ]
        logits = self._run(chunks)
        for seq_id in next_tokens:
            self.blocks.commit(seq_id, self.blocks.num_tokens(seq_id))
        return dict(zip(next_tokens, logits))

    def free(self, seq_id) -> None:
        self.blocks.free(seq_id)


def greedy_generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    page_size: int = 16,
    token_budget: int = 64,
    eos_token_id=None,
    return_logits: bool = False,
    mesh=None,
):
    """Greedy continuations of `prompts` (prefilled one by one, decoded together); with
    `return_logits`, also f32[len(seq) - 1, V] per sequence: the logits that predicted
    every token after the first. With `mesh`, KV pages are sharded on kv heads and every
    step runs under the mesh (attention per device on its heads)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    max_len = max(len(p) for p in prompts) + max_new_tokens
    runner = PagedRunner(
        model,
        num_pages=len(prompts) * math.ceil(max_len / page_size),
        page_size=page_size,
        max_seq_len=max_len,
        token_budget=token_budget,
        enable_prefix_caching=False,
        mesh=mesh,
    )
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    outputs: list[list[int]] = [[] for _ in prompts]
    logits: list[list[np.ndarray]] = [[] for _ in prompts]
    last = {}
    for i, prompt in enumerate(prompts):
        _, prompt_logits = runner.prefill(i, list(prompt))
        logits[i].append(prompt_logits)
        last[i] = prompt_logits[-1]
    while last:
        next_tokens = {}
        for i, row in last.items():
            token = int(np.argmax(row))
            outputs[i].append(token)
            if len(outputs[i]) < max_new_tokens and token not in eos:
                next_tokens[i] = token
        if not next_tokens:
            break
        last = runner.decode(next_tokens)
        for i, row in last.items():
            logits[i].append(row[None])
    if not return_logits:
        return outputs
    return outputs, [
        np.concatenate(ls)[: len(p) + len(o) - 1] for ls, p, o in zip(logits, prompts, outputs)
    ]
