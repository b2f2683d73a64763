"""The serving engine: continuous batching over the paged KV cache, a call ahead of the host.

`add_request`, `abort` and `step` are the whole contract, plus `update_params` through
which an RL trainer hands over its new weights after each optimizer step. Each `step`:

1. the scheduler plans the next call (plain Python): prefill chunks and decodes, or,
   when no prompt work is waiting, `num_decode_steps` decode steps of every running
   sequence in one call (pages reserved for all of them);
2. the engine sends the device what changed (slots of sequences that join or leave,
   new block-table entries, copy-on-write) and dispatches the call (model_runner.py);
   tokens are sampled, written back into their slots and checked for stop ids and
   lengths on device;
3. it then reads the results of the call before (`async_scheduling`), so the host
   plans and post-processes while the device computes; it appends the tokens, checks
   stops again (and stop strings: text past a stop is never emitted, tokens after it are
   dropped), frees what finished and emits outputs.

Not thread safe: one thread owns an Engine (serve/async_engine.py puts it behind asyncio).
With `mesh=`, the KV pages are sharded on kv heads and the calls run under the mesh; the
caller places the model's weights on it (`model.sharding.shard_model`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tandem.model.transformer import Transformer
from tandem.paged_cache import BlockManager
from tandem.serve.buckets import bucket_for
from tandem.serve.engine_config import EngineConfig, QueueFullError, num_kv_pages
from tandem.serve.host_masks import HostMasks, all_allowed
from tandem.serve.model_runner import ModelRunner
from tandem.serve.output import RequestOutput
from tandem.serve.prompt_logprobs import record_prompt_logprobs
from tandem.serve.request_outputs import request_outputs
from tandem.serve.sampler import needs_full_sampler, stop_ids_of
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from tandem.serve.sequence import Request, Sequence, Status
from tandem.serve.slot_table import SlotTable
from tandem.serve.step_inputs import mixed_step
from tandem.serve.stops import StopChecker

__all__ = ["Engine", "EngineConfig", "QueueFullError"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Call:
    """A dispatched call: its device results and, per sampled row, who gets the tokens."""

    result: object  # StepResult of device arrays
    rows: list[tuple[Sequence, int, int]]  # (sequence, row, tokens in flight for it)
    logits: object = None  # f32[T, V] for prompt logprobs
    prompt_chunks: list = dataclasses.field(default_factory=list)  # (seq, start, n, offset)


class Engine:
    def __init__(
        self,
        model: Transformer,
        tokenizer,
        config: EngineConfig | None = None,
        *,
        model_name: str = "tandem",
        mesh=None,
    ):
        cfg = model.config
        config = config or EngineConfig()
        self.config = config
        self.model_config = cfg
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.mesh = mesh
        kv_dtype = jnp.dtype(config.kv_dtype) if config.kv_dtype else model.embed.dtype
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        num_pages = config.num_pages or num_kv_pages(
            config, cfg, kv_dtype, mesh, self.max_model_len
        )
        self.max_model_len = min(self.max_model_len, num_pages * config.page_size)
        self.pages_per_seq = math.ceil(self.max_model_len / config.page_size)
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
        self.runner = ModelRunner(
            model,
            num_pages=num_pages,
            page_size=config.page_size,
            max_num_seqs=config.max_num_seqs,
            pages_per_seq=self.pages_per_seq,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_decode_steps=config.num_decode_steps,
            kv_dtype=kv_dtype,
            mesh=mesh,
            seed=config.seed,
        )
        eos = (
            tokenizer.eos_token_id
            if tokenizer is not None and tokenizer.eos_token_id is not None
            else cfg.eos_token_id
        )
        self._eos = set(np.atleast_1d(eos if eos is not None else []).tolist())
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0
        self.num_param_updates = 0
        self._request_serial = itertools.count()  # tells apart requests reusing a finished id
        self.slots = SlotTable(self.runner, self.blocks, cfg.vocab_size, self._stop_ids)
        self.host_masks = HostMasks(tokenizer, cfg.vocab_size, self._eos)
        self._in_flight: collections.deque[_Call] = collections.deque()

    @property
    def params(self) -> nnx.State:
        return self.runner.params

    @property
    def kv(self) -> list[jax.Array]:
        return self.runner.kv

    # Public contract.

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        client: str = "default",
        priority: int = 0,
        stream: bool = True,
    ) -> None:
        """Queues a request; raises ValueError (bad request) or QueueFullError. With
        `stream=False` the request's only output is its last (no text decoded per step)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        params.check_token_ids(vocab)
        self.host_masks.check(params)  # a grammar that does not compile
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request asks for {len(prompt)} prompt + {params.max_tokens} completion tokens"
            )
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.scheduler.waiting)} requests are waiting")
        request = Request(request_id, prompt, params, stream=stream)
        self.requests[request_id] = request
        # n > 1: one sequence computes the prompt; the others fork from its pages.
        # Prompt logprobs need logits at every prompt position: no prefix-cache hits, not
        # even from an earlier request with the same id.
        namespace = (
            f"prompt_logprobs:{request_id}:{next(self._request_serial)}"
            if params.prompt_logprobs is not None
            else None
        )
        self.scheduler.add(self._new_seq(request, 0, client, priority, namespace))

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        """Whether a request waits or runs (a call left in flight for aborted requests
        only is collected, and ignored, by the next step)."""
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
        self.runner.set_params(params)
        self.blocks.reset_prefix_cache()
        self.num_param_updates += 1

    def step(self) -> list[RequestOutput]:
        """Dispatches the next call, then returns the outputs of the call before it (of this
        one, without `async_scheduling`, or when nothing new could be dispatched)."""
        changed: list[Sequence] = []
        # A running sequence with a host mask (a grammar) needs the tokens in flight for
        # its next mask: one step per call, none ahead (serve/host_masks.py).
        constrained = any(seq.host_mask is not None for seq in self.scheduler.running)
        while constrained and self._in_flight:
            changed += self._collect(self._in_flight.popleft())
        lookahead = 1 if constrained else self.config.num_decode_steps
        plan = self.scheduler.schedule(lookahead, can_preempt=not self._in_flight)
        if plan.needs_drain:  # a preemption must see every token first
            if plan.copies:  # made by reservations before the stop: still owed
                self.runner.copy_blocks([(c.src_block, c.dst_block) for c in plan.copies])
            while self._in_flight:
                changed += self._collect(self._in_flight.popleft())
            plan = self.scheduler.schedule(lookahead)
        if plan.chunks:
            self._in_flight.append(self._dispatch(plan))
        keep = 1 if plan.chunks and self.config.async_scheduling and not constrained else 0
        while len(self._in_flight) > keep:
            changed += self._collect(self._in_flight.popleft())
        return self._outputs(changed)

    def run_until_done(self, on_finish=None) -> dict[str, RequestOutput]:
        """Steps until no request is unfinished; returns each request's last output by id
        (`on_finish(output)` is called as each one finishes: a progress bar)."""
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
                    if on_finish is not None:
                        on_finish(out)
        return done

    def warm_up(self, *, full: bool = True, logprobs: bool = False) -> float:
        """Compiles every step shape now (seconds): none compiles while serving requests
        of the kinds warmed (`ModelRunner.warm_up`)."""
        return self.runner.warm_up(full=full, logprobs=logprobs)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.blocks.usage,
            "num_prompt_tokens": self.num_prompt_tokens,  # of requests past their first token
            **self.scheduler.make_stats(),
            "clients": {c: dict(v) for c, v in self.scheduler.service.items()},
            "num_compiles": self.runner.num_compiles,
            "num_param_updates": self.num_param_updates,
        }

    # Dispatch: the host's plan -> diffs and one call on device.

    def _dispatch(self, plan: SchedulerOutput) -> _Call:
        completing = [c for c in plan.chunks if c.completes and not c.is_decode]
        forks, num_free = {}, self.scheduler.num_free_seqs
        for c in completing:
            if self._is_group_parent(c.seq):
                forks[c.seq] = self._fork_group(c.seq, num_free)
                num_free -= len(forks[c.seq])
        self.scheduler.scheduled(plan)
        for parent, children in forks.items():
            for child in children:
                self.scheduler.fork(parent, child)
                child.num_inflight_tokens = 1
        members = [c.seq for c in plan.chunks]
        children = [child for group in forks.values() for child in group]
        self.slots.sync([(c.seq, c.start) for c in plan.chunks] + [(c, 0) for c in children])
        if plan.copies:
            self.runner.copy_blocks([(c.src_block, c.dst_block) for c in plan.copies])
        masked = [seq for seq in members + children if seq.host_mask is not None]
        # Computed while the device runs the step's forward (serve/steps.py).
        bitmask = functools.partial(self._bitmask, masked) if masked else None
        if plan.has_prefill:
            step = mixed_step(
                plan,
                forks,
                num_tokens=bucket_for(plan.num_tokens, self.runner.token_buckets),
                num_slots=self.config.max_num_seqs,
            )
            rows = [seq for seq, _, _ in step.rows]
            result, logits = self.runner.mixed(
                step.inputs, self._num_top_of(rows), step.want_logits, _is_full(rows), bitmask
            )
            return _Call(result, step.rows, logits, step.prompt_chunks)
        num_slots = bucket_for(max(c.seq.slot for c in plan.chunks) + 1, self.runner.slot_buckets)
        # Rounded up to a step bucket: the device stops each slot at its own cap.
        num_steps = bucket_for(max(c.num_tokens for c in plan.chunks), self.runner.step_buckets)
        result = self.runner.decode(
            num_steps, num_slots, self._num_top_of(members), _is_full(members), bitmask
        )
        return _Call(result, [(c.seq, c.seq.slot, c.num_tokens) for c in plan.chunks])

    # Collect: a call's results -> tokens, stops, outputs.

    def _collect(self, call: _Call) -> list[Sequence]:
        result = jax.device_get(call.result)
        if call.prompt_chunks:
            logits = np.asarray(call.logits)
            for seq, start, n, offset in call.prompt_chunks:
                if seq.status != Status.FINISHED:
                    record_prompt_logprobs(seq.request, start, logits[offset : offset + n])
        changed = []
        for seq, row, num_scheduled in call.rows:
            tokens = result.tokens[:, row]
            produced = tokens[: np.argmax(tokens < 0)] if tokens.min() < 0 else tokens
            try:
                accepted = self._accept(seq, produced, result, row)
            except Exception as e:  # noqa: BLE001 - one request's failure stays its own
                logger.exception("request %s failed", seq.request.request_id)
                self._fail(seq.request, f"{type(e).__name__}: {e}")
                accepted = []
            self.scheduler.tokens_arrived(seq, accepted, num_scheduled)
            if accepted or seq.status == Status.FINISHED:
                changed.append(seq)
        return changed

    def _accept(self, seq: Sequence, produced: np.ndarray, result, row: int) -> list[int]:
        """Appends the tokens the device produced for `seq` up to its first stop; returns
        those appended (none for a sequence that finished or was aborted meanwhile)."""
        if seq.status == Status.FINISHED or not len(produced):
            return []
        first = not seq.output_token_ids
        accepted, reason = seq.append_until_stop(produced.tolist(), result, row, self._eos)
        if seq.host_mask is not None and seq.host_mask.accept(accepted):
            if seq.host_mask.failed:
                raise ValueError(seq.host_mask.failed)
            reason = reason or "stop"  # the grammar is complete
        if first and seq.index == 0:
            seq.request.num_cached_tokens = seq.num_cached_tokens
            self.num_prompt_tokens += len(seq.prompt_token_ids)
            self.num_cached_prompt_tokens += seq.num_cached_tokens
        if reason is not None:
            self.scheduler.finish(seq, reason)
        return accepted

    def _bitmask(self, masked: list[Sequence]) -> np.ndarray:
        """i32[S, W], the tokens each slot may sample: all but those of `masked`."""
        bitmask = all_allowed(self.config.max_num_seqs, self.model_config.vocab_size)
        self.host_masks.fill(masked, bitmask)
        return bitmask

    def _fail(self, request: Request, error: str) -> None:
        request.error = error
        for seq in request.seqs:
            self.scheduler.finish(seq, "error")

    def _outputs(self, changed: list[Sequence]) -> list[RequestOutput]:
        outputs = request_outputs(changed)
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)
        return outputs

    # Sequences.

    def _new_seq(self, request: Request, index, client, priority, namespace) -> Sequence:
        params = request.params
        seq = Sequence(
            f"{request.request_id}#{index}",
            list(request.prompt_token_ids),
            client=client,
            priority=priority,
            namespace=namespace,
            max_num_tokens=min(
                len(request.prompt_token_ids) + params.max_tokens, self.max_model_len
            ),
            request=request,
            index=index,
            stops=StopChecker(self.tokenizer, params) if self.tokenizer is not None else None,
            logprobs=[] if params.logprobs is not None else None,
            host_mask=self.host_masks.make(params),
        )
        request.seqs.append(seq)
        return seq

    def _is_group_parent(self, seq: Sequence) -> bool:
        request = seq.request
        return (
            request.params.n > 1
            and seq.index == 0
            and len(request.seqs) == 1
            and seq.num_generated == 0
        )

    def _fork_group(self, parent: Sequence, num_free: int) -> list[Sequence]:
        """The other n - 1 members of `parent`'s group: as many as there are free slots fork
        from its pages now; the rest wait and compute the prompt themselves (prefix-cache
        hits), so a group larger than the batch runs over several steps."""
        request = parent.request
        children = [
            self._new_seq(request, i, parent.client, parent.priority, parent.namespace)
            for i in range(1, request.params.n)
        ]
        num_now = max(0, num_free)
        for child in children[num_now:]:
            self.scheduler.add(child)
        return children[:num_now]

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        return stop_ids_of(params, self._eos)

    def _num_top_of(self, seqs) -> int:
        return self.runner.num_top if any(s.request.params.logprobs for s in seqs) else 0


def _is_full(seqs: list[Sequence]) -> bool:
    return any(needs_full_sampler(s.request.params) for s in seqs)
