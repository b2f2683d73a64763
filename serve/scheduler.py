"""Which sequences run in the next step, and how many of their tokens.

A V1-style token-budget scheduler over the host `BlockManager` (plain Python; no jax):

1. running decodes first, one token each, so a long prompt never stalls them;
2. then running prefills continue, a chunk each (chunked prefill is always on);
3. then waiting sequences are admitted, in the policy's order, while the budget, the
   sequence limit and the free pages allow; a prefix-cache hit skips its tokens.

When a decode needs a page and none is free, the last running sequence in the policy's
order (the newest, or the lowest priority) is preempted by recompute: its pages are
freed and it waits again with every token it had.

The engine samples on device and may run several decode steps per call, ahead of the
host: a decode chunk covers `lookahead` steps (pages reserved for all of them, capped by
the sequence's `max_num_tokens`), and `scheduled` marks the tokens computed when the call
is dispatched, not when its results come back. A sequence with in-flight tokens cannot be
preempted (its tokens are not known yet): with `can_preempt=False` the output says
`needs_drain` instead, and the engine collects every call in flight and asks again.

Policies: `fcfs` (arrival), `priority` (lower value first, then arrival) and `vtc`, the
Virtual Token Counter of Sheng et al. (OSDI'24): each client has a counter charged
`w_in` per prompt token at admission and `w_out` per generated token, both divided by
the client's weight; admission goes to the waiting client with the smallest counter,
and a client returning from idle is lifted to the smallest counter of the active ones,
so that idling banks no credit.

The scheduler also counts what vLLM's SchedulerStats and IterationStats report
(`make_stats`): preemptions, prefix-cache queries and hits in tokens (first admissions
only), generated tokens, finished sequences by reason, and the tokens of each forward
pass (bucket counts of `ITERATION_TOKENS_BUCKETS`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time

from tandem.paged_cache import BlockCopy, BlockManager
from tandem.serve.sequence import Sequence, Status

POLICIES = ("fcfs", "priority", "vtc")
FINISH_REASONS = ("stop", "length", "abort", "error")
# vLLM's iteration_tokens_total buckets (upper bounds, inclusive).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """The token budget of one step (decodes + prefill chunks)."""
    max_num_seqs: int = 64
    """Sequences running at once."""
    policy: str = "fcfs"
    """fcfs, priority or vtc."""
    vtc_input_weight: float = 1.0
    """VTC: counter charge per prompt token (w_in)."""
    vtc_output_weight: float = 2.0
    """VTC: counter charge per generated token (w_out)."""
    client_weights: tuple[tuple[str, float], ...] = ()
    """VTC: a client's share; its charges are divided by it (default 1)."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(
                f"SchedulerConfig.policy: unknown policy {self.policy!r}; choose from {POLICIES}"
            )
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(
                "SchedulerConfig: max_num_batched_tokens and max_num_seqs must be positive"
            )
        if any(w <= 0 for _, w in self.client_weights):
            raise ValueError("SchedulerConfig.client_weights must be positive")


@dataclasses.dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first new token's position
    num_tokens: int  # prompt tokens, or decode steps
    is_decode: bool = False  # input tokens come from the device, one per step
    completes: bool = False  # the chunk reaches the last token: its logits get sampled

    def __post_init__(self):
        if self.is_decode:
            self.completes = True
            self.token_ids: list[int] = []
        else:
            self.completes = self.start + self.num_tokens == self.seq.num_tokens
            self.token_ids = self.seq.token_ids[self.start : self.start + self.num_tokens]


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    copies: list[BlockCopy]  # copy-on-write to run on device before the step
    preempted: list[Sequence]
    needs_drain: bool = False  # a preemption waits for the calls in flight

    @property
    def num_tokens(self) -> int:
        """Tokens of one step: a decode chunk counts one whatever its lookahead."""
        return sum(1 if c.is_decode else c.num_tokens for c in self.chunks)

    @property
    def has_prefill(self) -> bool:
        return any(not c.is_decode for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.counters: dict[str, float] = {}  # VTC
        self.service: dict[str, dict[str, int]] = {}  # tokens served per client
        self._arrivals = itertools.count()
        self._weights = dict(config.client_weights)
        self.num_preemptions = 0
        self.num_prefix_cache_queries = 0  # prompt tokens looked up at first admissions
        self.num_prefix_cache_hits = 0  # of them, tokens found in the cache
        self.num_generation_tokens = 0
        self.num_finished = dict.fromkeys(FINISH_REASONS, 0)  # sequences, by reason
        # Forward passes by tokens computed: one count per bucket (the last is +Inf).
        self.iteration_tokens = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.iteration_tokens_sum = 0

    # Queue changes.

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = Status.WAITING
        client = seq.client
        if client not in self._active_clients():
            # VTC counter lift: a client back from idle starts at the active minimum.
            active = [self.counters[c] for c in self._active_clients()]
            self.counters[client] = max(self.counters.get(client, 0.0), min(active, default=0.0))
        self.service.setdefault(client, {"prompt_tokens": 0, "generated_tokens": 0})
        self.waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Starts `child` running on `parent`'s pages (n > 1 sampling, GRPO groups): the
        prompt is computed once and its blocks are shared, copied only on write."""
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.arrival = parent.arrival
        child.status = Status.RUNNING
        child.num_computed_tokens = parent.num_computed_tokens
        self.running.append(child)

    @property
    def num_free_seqs(self) -> int:
        return self.config.max_num_seqs - len(self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (stop, length, abort) and returns its pages."""
        if seq.status == Status.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.num_finished[reason] = self.num_finished.get(reason, 0) + 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # The step.

    def schedule(self, lookahead: int = 1, can_preempt: bool = True) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        copies: list[BlockCopy] = []
        preempted: list[Sequence] = []
        self.running.sort(key=self._order)

        # 1. Decodes: the token sampled last (maybe still on device) needs a slot, and each
        # lookahead step one more; a sequence whose last tokens are all in flight waits.
        for seq in [s for s in self.running if s.is_decoding]:
            if budget == 0:
                break
            if seq.status != Status.RUNNING:
                continue  # preempted below for an earlier sequence's page
            steps = min(lookahead, seq.max_num_tokens - seq.num_tokens)
            if steps <= 0:
                continue
            start = seq.num_computed_tokens
            while not self.blocks.can_reserve(seq.seq_id, start, start + steps):
                victim = self.running[-1]
                if not can_preempt or victim.num_inflight_tokens:
                    return SchedulerOutput(chunks, copies, preempted, needs_drain=True)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:
                continue
            copies += self.blocks.reserve(seq.seq_id, start, start + steps)
            chunks.append(ScheduledChunk(seq, start, steps, is_decode=True))
            budget -= 1

        # 2. Running prefills continue (their prompt pages were taken at admission).
        for seq in [s for s in self.running if not s.is_decoding]:
            if budget == 0:
                break
            if seq.num_pending_tokens == 0:
                continue  # its last prompt chunk is in flight
            n = min(seq.num_pending_tokens, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n

        # 3. Admit waiting sequences (not in a step that had to preempt: pages are short).
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self._next_waiting()
            if not self.blocks.can_allocate(seq.token_ids, seq.namespace):
                break
            num_cached = self.blocks.allocate(seq.seq_id, seq.token_ids, seq.namespace)
            self.waiting.remove(seq)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached
                seq.first_scheduled_time = time.monotonic()
                self.num_prefix_cache_queries += len(seq.token_ids)
                self.num_prefix_cache_hits += num_cached
                self._charge(seq.client, len(seq.prompt_token_ids), "prompt_tokens")
            seq.num_computed_tokens = num_cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_pending_tokens, budget)
            chunks.append(ScheduledChunk(seq, num_cached, n))
            budget -= n
        if any(not c.is_decode for c in chunks):
            # A step with prompt work runs once: its decodes take one token (the pages
            # reserved for the lookahead stay theirs for the next calls).
            for c in chunks:
                if c.is_decode:
                    c.num_tokens = 1
        return SchedulerOutput(chunks, copies, preempted)

    def scheduled(self, output: SchedulerOutput) -> None:
        """The step was dispatched: its tokens count as computed (the device runs calls in
        order, so every later call sees their K/V), and each completing chunk has tokens
        in flight, one per step."""
        self._count_iteration_tokens(output)
        for chunk in output.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if not chunk.is_decode:
                self.blocks.commit(seq.seq_id, seq.num_computed_tokens)
            if chunk.completes:
                seq.num_inflight_tokens += chunk.num_tokens if chunk.is_decode else 1

    def tokens_arrived(self, seq: Sequence, token_ids: list[int], num_scheduled: int) -> None:
        """A call's results for one sequence: `num_scheduled` tokens were in flight, and
        the engine appended `token_ids` of them to its output (fewer when it stopped)."""
        seq.num_inflight_tokens -= num_scheduled
        if not token_ids:
            return
        if seq.seq_id in self.blocks:
            self.blocks.record_tokens(seq.seq_id, token_ids)
            # The newest token's K/V are computed by the next step, not this one.
            computed = min(seq.num_computed_tokens, seq.num_known_tokens - 1)
            self.blocks.commit(seq.seq_id, computed)
        self._charge(seq.client, len(token_ids), "generated_tokens")
        self.num_generation_tokens += len(token_ids)

    # Counters.

    def make_stats(self) -> dict:
        """The counters so far (plain data: they cross into the server's process)."""
        return {
            "num_preemptions": self.num_preemptions,
            "num_prefix_cache_queries": self.num_prefix_cache_queries,
            "num_prefix_cache_hits": self.num_prefix_cache_hits,
            "num_generation_tokens": self.num_generation_tokens,
            "num_finished": dict(self.num_finished),
            "iteration_tokens": (list(self.iteration_tokens), self.iteration_tokens_sum),
        }

    def _count_iteration_tokens(self, output: SchedulerOutput) -> None:
        """A call with prompt work is one forward pass of `num_tokens`; a decode call runs
        as many passes as its longest chunk has steps, pass j with the chunks longer than j
        (each sequence stops at its own cap)."""
        if output.has_prefill:
            passes = [output.num_tokens]
        else:
            steps = [c.num_tokens for c in output.chunks]
            passes = [sum(s > j for s in steps) for j in range(max(steps, default=0))]
        for num_tokens in passes:
            self.iteration_tokens[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
            self.iteration_tokens_sum += num_tokens

    # Policy.

    def _order(self, seq: Sequence):
        if self.config.policy == "priority":
            return (seq.priority, seq.arrival)
        return (seq.arrival,)

    def _next_waiting(self) -> Sequence:
        if self.config.policy == "vtc":
            client = min(
                {s.client for s in self.waiting}, key=lambda c: (self.counters.get(c, 0.0), c)
            )
            return min((s for s in self.waiting if s.client == client), key=self._order)
        return min(self.waiting, key=self._order)

    def _active_clients(self) -> set[str]:
        return {s.client for s in self.waiting} | {s.client for s in self.running}

    def _charge(self, client: str, num_tokens: int, kind: str) -> None:
        weight = (
            self.config.vtc_input_weight
            if kind == "prompt_tokens"
            else self.config.vtc_output_weight
        )
        self.counters[client] = self.counters.get(
            client, 0.0
        ) + weight * num_tokens / self._weights.get(client, 1.0)
        self.service[client][kind] += num_tokens

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: free the pages, keep the tokens, wait again."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.append(seq)
