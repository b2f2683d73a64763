"""A minimal greedy generator over the paged serving forward.

It gives each sequence a fixed run of pages and feeds prompts in chunks of at most
`token_budget` tokens per step, then decodes one token per sequence per step. It is the
demo path of `tandem generate` and the harness of the serving-forward tests; the
continuous-batching engine (serve/engine.py) replaces it for real traffic.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from tandem.model.kv_cache import KV_AXES, init_kv_cache
from tandem.model.sharding import named_sharding
from tandem.model.transformer import Transformer
from tandem.serve.batch import SeqChunk, build_batch
from tandem.serve.model_step import make_model_step


def bucket(n: int, minimum: int = 8) -> int:
    """The next power of two >= n: a handful of shapes, so few compilations."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def greedy_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *,
                    page_size: int = 16, token_budget: int = 64, eos_token_id=None,
                    return_logits: bool = False, mesh=None):
    """Greedy continuations of `prompts`; with `return_logits`, also f32[len(seq)-1, V] per
    sequence: the logits that predicted every token after the first. With `mesh`, the KV
    pages are sharded on kv heads like the model's weights."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    cfg = model.config
    step, params = make_model_step(model)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    pages_per_seq = math.ceil(max_len / page_size)
    kv_shape = (len(prompts) * pages_per_seq, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
    sharding = named_sharding(mesh, KV_AXES, kv_shape) if mesh is not None else None
    kv = init_kv_cache(cfg, kv_shape[0], page_size, dtype=model.embed.dtype, sharding=sharding)
    tables = [list(range(i * pages_per_seq, (i + 1) * pages_per_seq))
              for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    num_computed = [0] * len(prompts)  # tokens whose K/V are in the cache
    logits_per_seq: list[list[np.ndarray]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])

    while not all(done):
        budget, chunks, owners = token_budget, [], []
        for i, seq in enumerate(seqs):
            pending = len(seq) - num_computed[i]
            if done[i] or pending == 0 or budget == 0:
                continue
            n = min(pending, budget)
            chunks.append(SeqChunk(seq[num_computed[i] : num_computed[i] + n], num_computed[i],
                                   tables[i]))
            owners.append(i)
            budget -= n
        num_tokens = sum(len(c.token_ids) for c in chunks)
        tokens, md = build_batch(chunks, page_size, num_tokens=bucket(num_tokens),
                                 num_seqs=bucket(len(prompts)), pages_per_seq=pages_per_seq)
        kv, logits = step(params, kv, jnp.asarray(tokens), md)
        logits = np.asarray(logits)
        t = 0
        for i, c in zip(owners, chunks):
            n = len(c.token_ids)
            if return_logits:
                logits_per_seq[i].append(logits[t : t + n])
            num_computed[i] += n
            t += n
            if num_computed[i] == len(seqs[i]):  # the last logits predict a new token
                next_token = int(np.argmax(logits[t - 1]))
                seqs[i].append(next_token)
                generated = len(seqs[i]) - len(prompts[i])
                if generated >= max_new_tokens or next_token in eos:
                    done[i] = True
    outputs = [s[len(p) :] for s, p in zip(seqs, prompts)]
    if not return_logits:
        return outputs
    return outputs, [np.concatenate(ls)[: len(s) - 1] for ls, s in zip(logits_per_seq, seqs)]
