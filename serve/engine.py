"""The serving engine: continuous batching over the paged KV cache.

`add_request`, `abort` and `step` are the whole contract, plus `update_params` through
which an RL trainer hands over its new weights after each optimizer step. Each step the
scheduler picks the chunks to compute (plain Python), the batch is built in numpy, one
jitted function runs the model over the pages and samples the completing rows on device,
and the host updates the sequences, checks stops and emits deltas. Not thread safe: one
thread owns an Engine (serve/async_engine.py puts it behind asyncio).

With `mesh=`, the KV pages are sharded on kv heads and the step runs under
`jax.set_mesh(mesh)`, so attention runs per device on its heads; the caller places the
model's weights on the same mesh (`model.sharding.shard_model`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.model.kv_cache import KV_AXES, copy_blocks, init_kv_cache, num_pages_for_budget
from tandem.model.sharding import named_sharding
from tandem.model.transformer import Transformer
from tandem.paged_cache import BlockManager
from tandem.serve.batch import SeqChunk, build_batch
from tandem.serve.model_step import mesh_context
from tandem.serve.output import CompletionOutput, RequestOutput, TokenLogprob
from tandem.serve.sampler import SamplingBatch, sample
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.scheduler import Scheduler, SchedulerConfig
from tandem.serve.sequence import Sequence, Status
from tandem.serve.stops import StopChecker


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
    """Sequences running at once; the sequence axis of every batch."""
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


def _buckets(limit: int, minimum: int) -> list[int]:
    """Powers of two from `minimum`, capped by `limit` (which is itself the last bucket)."""
    out, b = [], minimum
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None


@dataclasses.dataclass
class _SeqData:
    request: _Request
    index: int  # which of the request's n completions
    stops: StopChecker
    logprobs: list[TokenLogprob] | None


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        config: EngineConfig = EngineConfig(),
        *,
        model_name: str = "tandem",
        mesh=None,
    ):
        cfg = model.config
        self.config = config
        self.model_config = cfg
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.mesh = mesh
        kv_dtype = jnp.dtype(config.kv_dtype) if config.kv_dtype else model.embed.dtype
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        num_pages = config.num_pages or self._num_pages(cfg, kv_dtype, mesh)
        self.max_model_len = min(self.max_model_len, num_pages * config.page_size)
        self.pages_per_seq = math.ceil(self.max_model_len / config.page_size)
        self.token_buckets = _buckets(config.max_num_batched_tokens, 16)
        self.blocks = BlockManager(num_pages, config.page_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_batched_tokens,
                config.max_num_seqs,
                config.policy,
                client_weights=config.client_weights,
            ),
            self.blocks,
        )
        shape = (num_pages, config.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
        sharding = None
        if mesh is not None:
            # Spelled as jit hands sharded outputs back (no trailing Nones): the pages a
            # step returns must match the ones it was compiled for, or the next step of
            # the same shapes compiles again.
            spec = list(named_sharding(mesh, KV_AXES, shape).spec)
            while spec and spec[-1] is None:
                spec.pop()
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        self.kv = init_kv_cache(cfg, num_pages, config.page_size, kv_dtype, sharding)
        self.graphdef, self.params = nnx.split(model)
        self._step_fn = self._make_step_fn()
        self._key = jax.random.key(config.seed)
        self._eos = set(
            np.atleast_1d(
                tokenizer.eos_token_id
                if tokenizer is not None and tokenizer.eos_token_id is not None
                else cfg.eos_token_id
                if cfg.eos_token_id is not None
                else []
            ).tolist()
        )
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_param_updates = 0
        self._request_serial = itertools.count()  # tells apart requests reusing a finished id

    # Public contract.

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        client: str = "default",
        priority: int = 0,
    ) -> None:
        """Queues a request; raises ValueError (bad request) or QueueFullError."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request asks for {len(prompt)} prompt + {params.max_tokens} completion tokens"
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting")
        request = _Request(request_id, prompt, params, [])
        self.requests[request_id] = request
        # n > 1: one sequence computes the prompt; the others fork from its pages.
        # Prompt logprobs need logits at every prompt position: no prefix-cache hits, not
        # even from an earlier request with the same id.
        namespace = (
            f"prompt_logprobs:{request_id}:{next(self._request_serial)}"
            if params.prompt_logprobs is not None
            else None
        )
        seq = self._new_seq(request, 0, client, priority, namespace)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def update_params(self, params: nnx.State) -> None:
        """Serves `params` from the next step on, by reference: no device copy, no recompile.

        `params` must have the tree structure, shapes and dtypes of `self.params` (a trainer's
        `nnx.split(model)[1]` after an optimizer step). On a mesh they take the engine's own
        shardings: a train step hands back equivalent ones spelled its own way (P(None,
        'tensor') for P('fsdp', 'tensor', None) when fsdp is 1), which jit would key as new
        input types and compile the step again; `device_put` onto an equivalent sharding
        moves no data. The prefix cache is dropped, since its KV came from the old weights.
        Raises ValueError while requests are unfinished (their KV is stale too) or on the
        first mismatching leaf path.
        """
        if self.has_unfinished():
            raise ValueError(
                f"update_params: {len(self.requests)} requests are unfinished; their KV came "
                "from the old weights (finish or abort them first)"
            )
        _check_same_tree(self.params, params)
        if self.mesh is not None:
            params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, self.params))
        self.params = params
        self.blocks.reset_prefix_cache()
        self.num_param_updates += 1

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if not out.chunks:
            return []
        if out.copies:
            copies = np.array([[c.src_block, c.dst_block] for c in out.copies], np.int32)
            self.kv = _copy_blocks(self.kv, jnp.asarray(copies))
        chunks = [
            SeqChunk(c.token_ids, c.start, self.blocks.block_table(c.seq.seq_id))
            for c in out.chunks
        ]
        num_tokens = out.num_tokens
        t_bucket = next(b for b in self.token_buckets if b >= num_tokens)
        tokens, md = build_batch(
            chunks,
            self.config.page_size,
            num_tokens=t_bucket,
            num_seqs=self.config.max_num_seqs,
            pages_per_seq=self.pages_per_seq,
        )
        # Rows to sample: the last token of each completing chunk, n times for a prompt
        # whose group forks now.
        ends = np.cumsum([c.num_tokens for c in out.chunks]) - 1
        rows, row_seqs, row_index = [], [], []
        for chunk, end in zip(out.chunks, ends):
            if not chunk.completes:
                continue
            seq, data = chunk.seq, chunk.seq.data
            forks = (
                data.request.params.n
                if not seq.output_token_ids and data.index == 0 and len(data.request.seqs) == 1
                else 1
            )
            for i in range(forks):
                rows.append(end)
                row_seqs.append(seq)
                row_index.append(data.index + i)
        r_bucket = max(8, 1 << (max(len(rows), 1) - 1).bit_length())
        params_list = [s.data.request.params for s in row_seqs]
        sbatch = SamplingBatch.build(
            params_list,
            [s.prompt_token_ids for s in row_seqs],
            [s.output_token_ids for s in row_seqs],
            vocab_size=self.model_config.vocab_size,
            pad_to=r_bucket,
            sample_indices=row_index,
        )
        row_array = np.zeros(r_bucket, np.int32)
        row_array[: len(rows)] = rows
        self._key, key = jax.random.split(self._key)
        want_logits = any(c.seq.data.request.params.prompt_logprobs is not None for c in out.chunks)
        with mesh_context(self.mesh):
            self.kv, result, logits = self._step_fn(
                self.params,
                self.kv,
                jnp.asarray(tokens),
                md,
                jnp.asarray(row_array),
                sbatch,
                key,
                want_logits,
            )
        result = jax.tree.map(np.asarray, result)
        if want_logits:
            self._record_prompt_logprobs(out.chunks, np.asarray(logits[:num_tokens]))

        sampled = {}  # seq -> [(token, row)], in row order
        for r, seq in enumerate(row_seqs):
            sampled.setdefault(id(seq), []).append(r)
        grew = self.scheduler.update(out, lambda c: result.tokens[sampled[id(c.seq)][0]])
        changed = []
        for seq in grew:
            first, *fork_rows = sampled[id(seq)]
            changed.append(seq)
            # Fork before the parent's stop check: a parent whose first token is EOS is
            # finished (its pages freed) by _after_token, and its group still needs them.
            for r in fork_rows:
                child = self._new_seq(
                    seq.data.request, row_index[r], seq.client, seq.priority, seq.namespace
                )
                child.output_token_ids.append(int(result.tokens[r]))
                self.scheduler.fork(seq, child)
                self._after_token(child, result, r)
                changed.append(child)
            self._after_token(seq, result, first)
        return self._outputs(changed)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.blocks.usage,
            "prefix_hit_rate": (
                self.num_cached_prompt_tokens / self.num_prompt_tokens
                if self.num_prompt_tokens
                else 0.0
            ),
            "clients": {c: dict(v) for c, v in self.scheduler.service.items()},
            "num_compiles": self._step_fn._cache_size(),
            "num_param_updates": self.num_param_updates,
        }

    # Internals.

    def _num_pages(self, cfg, kv_dtype, mesh) -> int:
        shards = 1
        if mesh is not None:
            # As the pages will be placed: kv heads that the rules cannot split replicate.
            page = (1, self.config.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)
            shards = page[2] // named_sharding(mesh, KV_AXES, page).shard_shape(page)[2]
        min_pages = self.config.max_num_seqs
        if self.config.kv_budget_bytes is not None:
            return num_pages_for_budget(
                cfg,
                self.config.page_size,
                dtype=kv_dtype,
                budget_bytes=self.config.kv_budget_bytes,
                num_kv_shards=shards,
                min_pages=min_pages,
            )
        stats = jax.devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            return num_pages_for_budget(
                cfg,
                self.config.page_size,
                dtype=kv_dtype,
                memory_fraction=self.config.kv_memory_fraction,
                num_kv_shards=shards,
                min_pages=min_pages,
            )
        # A host without a memory report (CPU): room for every sequence at full length.
        return self.config.max_num_seqs * math.ceil(self.max_model_len / self.config.page_size)

    def _make_step_fn(self):
        graphdef = self.graphdef

        @functools.partial(jax.jit, donate_argnums=(1,), static_argnums=(7,))
        def step(params, kv, tokens, md, rows, sbatch, key, want_logits):
            model = nnx.merge(graphdef, params)
            logits, kv = model.forward_paged(tokens, kv, md)  # [T, V]
            result = sample(logits[rows], sbatch, key)
            return kv, result, (logits if want_logits else None)

        return step

    def _new_seq(self, request, index, client, priority, namespace) -> Sequence:
        params = request.params
        seq = Sequence(
            f"{request.request_id}#{index}",
            list(request.prompt_token_ids),
            client=client,
            priority=priority,
            namespace=namespace,
        )
        seq.data = _SeqData(
            request,
            index,
            StopChecker(self.tokenizer, params),
            [] if params.logprobs is not None else None,
        )
        request.seqs.append(seq)
        return seq

    def _after_token(self, seq: Sequence, result, row: int) -> None:
        data, params = seq.data, seq.data.request.params
        token = seq.output_token_ids[-1]
        if data.logprobs is not None:
            k = params.logprobs
            top = list(zip(result.top_ids[row, :k].tolist(), result.top_logprobs[row, :k].tolist()))
            data.logprobs.append(TokenLogprob(token, float(result.logprobs[row]), top))
        request = data.request
        if len(seq.output_token_ids) == 1 and data.index == 0:
            request.num_cached_tokens = seq.num_cached_tokens
            self.num_prompt_tokens += len(seq.prompt_token_ids)
            self.num_cached_prompt_tokens += seq.num_cached_tokens
        reason = None
        if not params.ignore_eos and token in self._eos:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason = "stop"
        if data.stops.append(seq.output_token_ids, finished=reason is not None):
            reason = "stop"
        if reason is None and (
            len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
            data.stops.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _record_prompt_logprobs(self, chunks, logits: np.ndarray) -> None:
        """prompt_logprobs: the log-probability (raw or scaled, as `logprobs_mode` says) of
        each prompt token given the ones before it (the first has none), with the top
        alternatives."""
        start = 0
        for chunk in chunks:
            request = chunk.seq.data.request
            k = request.params.prompt_logprobs
            rows = logits[start : start + chunk.num_tokens] / request.params.logprob_temperature
            start += chunk.num_tokens
            if k is None or chunk.seq.data.index != 0 or chunk.seq.output_token_ids:
                continue
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None]
            # A sequence preempted part-way through its prompt recomputes it from the
            # start: entries past this chunk's first position are replaced, not repeated.
            del request.prompt_logprobs[chunk.start + 1 :]
            logp = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
            prompt = request.prompt_token_ids
            for i in range(chunk.num_tokens):
                pos = chunk.start + i + 1  # the token these logits predict
                if pos >= len(prompt):
                    break
                top = np.argsort(-logp[i])[:k]
                request.prompt_logprobs.append(
                    TokenLogprob(
                        prompt[pos],
                        float(logp[i, prompt[pos]]),
                        [(int(t), float(logp[i, t])) for t in top],
                    )
                )

    def _outputs(self, changed: list[Sequence]) -> list[RequestOutput]:
        by_request: dict[str, _Request] = {}
        for seq in changed:
            by_request[seq.data.request.request_id] = seq.data.request
        outputs = []
        for request_id, request in by_request.items():
            completions = []
            for seq in sorted(request.seqs, key=lambda s: s.data.index):
                text, new_text = seq.data.stops.take()
                new_ids = seq.output_token_ids[seq.data.stops.num_ids_emitted :]
                seq.data.stops.num_ids_emitted = len(seq.output_token_ids)
                completions.append(
                    CompletionOutput(
                        index=seq.data.index,
                        text=text,
                        token_ids=list(seq.output_token_ids),
                        new_text=new_text,
                        new_token_ids=new_ids,
                        logprobs=list(seq.data.logprobs) if seq.data.logprobs is not None else None,
                        finish_reason=seq.finish_reason,
                    )
                )
            finished = len(request.seqs) == request.params.n and all(
                s.status == Status.FINISHED for s in request.seqs
            )
            if finished:
                self.requests.pop(request_id, None)
            outputs.append(
                RequestOutput(
                    request_id,
                    request.prompt_token_ids,
                    completions,
                    finished,
                    request.num_cached_tokens,
                    request.prompt_logprobs,
                )
            )
        return outputs


def _check_same_tree(old, new) -> None:
    """Raises ValueError naming the first leaf path where `new` differs from `old` (a leaf
    missing or extra, another shape or dtype) or, failing that, if the structures differ."""
    flat = jax.tree_util.tree_flatten_with_path
    old_leaves = {jax.tree_util.keystr(p): x for p, x in flat(old)[0]}
    new_leaves = {jax.tree_util.keystr(p): x for p, x in flat(new)[0]}
    for path in list(old_leaves) + [p for p in new_leaves if p not in old_leaves]:
        if path not in new_leaves:
            raise ValueError(f"update_params: {path} is missing from the new params")
        if path not in old_leaves:
            raise ValueError(f"update_params: {path} is not a parameter of the served model")
        a, b = old_leaves[path], new_leaves[path]
        if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
            raise ValueError(
                f"update_params: {path} is {jnp.result_type(b)}{list(np.shape(b))}, "
                f"the served model's is {jnp.result_type(a)}{list(np.shape(a))}"
            )
    if jax.tree.structure(old) != jax.tree.structure(new):
        raise ValueError("update_params: the new params' tree structure differs")


_copy_blocks = jax.jit(copy_blocks, donate_argnums=(0,))
