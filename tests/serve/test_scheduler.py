"""Scheduler policies on a fake model whose next token is computable by hand:
next = (sum of the sequence's tokens) % 97. No device, no jax."""

import pytest

from tandem.paged_cache import BlockManager
from tandem.serve.scheduler import Scheduler, SchedulerConfig
from tandem.serve.sequence import Sequence, Status


def fake_next(chunk):
    return sum(chunk.seq.token_ids) % 97


def update(sched, out, sampled):
    """Dispatches `out` and lands each completing chunk's token, as the engine does with
    one step per call (no lookahead): returns the sequences that got a token."""
    sched.scheduled(out)
    grew = []
    for chunk in out.chunks:
        if chunk.completes and chunk.seq.status == Status.RUNNING:
            token = sampled(chunk)
            chunk.seq.output_token_ids.append(token)
            sched.tokens_arrived(chunk.seq, [token], 1)
            grew.append(chunk.seq)
    return grew


def run(sched, max_tokens, steps=10_000, on_step=None):
    """Drives the scheduler to completion; returns the step outputs."""
    outputs = []
    for _ in range(steps):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        outputs.append(out)
        for seq in update(sched, out, fake_next):
            if len(seq.output_token_ids) >= max_tokens[seq.seq_id]:
                sched.finish(seq, "length")
        if on_step:
            on_step(sched, out)
    assert not sched.has_unfinished()
    return outputs


def expected_output(prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(sum(tokens) % 97)
    return tokens[len(prompt) :]


def make(policy="fcfs", budget=8, num_blocks=64, block_size=4, max_num_seqs=8, **kw):
    cfg = SchedulerConfig(
        max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, policy=policy, **kw
    )
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def test_chunked_prefill_splits_a_long_prompt_by_the_budget():
    sched = make(budget=8)
    seq = Sequence("a", list(range(1, 21)))  # 20 tokens
    sched.add(seq)
    outs = run(sched, {"a": 3})
    # 20 prompt tokens at 8 per step: 8, 8, 4 (sample), then 2 decodes of 1
    assert [[c.num_tokens for c in o.chunks] for o in outs] == [[8], [8], [4], [1], [1]]
    assert [c.completes for o in outs for c in o.chunks] == [False, False, True, True, True]
    assert seq.output_token_ids == expected_output(range(1, 21), 3)


def test_running_decodes_go_first_and_are_never_stalled_by_a_long_prompt():
    sched = make(budget=8)
    sched.add(Sequence("short", [1, 2]))
    update(sched, sched.schedule(), fake_next)  # prefilled and sampled: now decoding
    sched.add(Sequence("long", list(range(40))))
    out = sched.schedule()
    # the decode takes 1 token, the long prompt the other 7
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 7)]


def test_prefix_hit_skips_cached_tokens():
    sched = make(budget=64, block_size=4)
    prefix = list(range(10, 22))  # 3 blocks
    sched.add(Sequence("a", prefix + [1]))
    run(sched, {"a": 1})
    b = Sequence("b", prefix + [2, 3])
    sched.add(b)
    out = sched.schedule()
    assert b.num_cached_tokens == 12
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(12, 2)]


def test_preemption_by_recompute_loses_nothing():
    # 6 blocks of 4 = 24 slots; three sequences of 6 prompt tokens growing to 14 each
    # cannot all fit, so the newest is preempted and later recomputed.
    sched = make(budget=16, num_blocks=6, block_size=4)
    prompts = {f"s{i}": [i + 1] * 6 for i in range(3)}
    seqs = {k: Sequence(k, p) for k, p in prompts.items()}
    for s in seqs.values():
        sched.add(s)
    outs = run(sched, {k: 8 for k in seqs})
    preempted = [s.seq_id for o in outs for s in o.preempted]
    assert preempted and preempted[0] == "s2"  # the newest goes first
    for k, s in seqs.items():
        assert s.output_token_ids == expected_output(prompts[k], 8), k
        assert s.status == Status.FINISHED
    assert sched.blocks.num_used_blocks == 0


def test_priority_admits_urgent_first_and_preempts_the_least_urgent():
    sched = make(policy="priority", budget=4, max_num_seqs=1)
    low = Sequence("low", [1, 2, 3], priority=5)
    high = Sequence("high", [4, 5, 6], priority=0)
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.chunks] == ["high"]
    # preemption order: the running sequence with the largest priority value goes first
    sched2 = make(policy="priority", budget=16, num_blocks=4, block_size=4)
    a, b = Sequence("a", [1] * 4, priority=0), Sequence("b", [2] * 4, priority=9)
    c = Sequence("c", [3] * 4, priority=1)
    for s in (b, a, c):
        sched2.add(s)
    outs = run(sched2, {"a": 6, "b": 6, "c": 6})
    assert [s.seq_id for o in outs for s in o.preempted][0] == "b"
    assert a.output_token_ids == expected_output([1] * 4, 6)


def test_vtc_counter_lift_by_hand():
    sched = make(policy="vtc", budget=100)
    sched.add(Sequence("a1", [1] * 10, client="A"))
    sched.schedule()  # admits a1: counter A = 1 * 10 = 10
    assert sched.counters["A"] == 10
    # B arrives idle: lifted to the active minimum (10), not left at 0
    sched.add(Sequence("b1", [1] * 3, client="B"))
    assert sched.counters["B"] == 10
    sched.schedule()  # b1 admitted: B = 10 + 3; a1 decodes after sampling
    assert sched.counters["B"] == 13


def test_vtc_weights_divide_the_charges():
    sched = make(policy="vtc", budget=100, client_weights=(("gold", 2.0),))
    sched.add(Sequence("g", [1] * 10, client="gold"))
    sched.schedule()
    assert sched.counters["gold"] == 5.0


def served(sched, client):
    s = sched.service[client]
    return 1.0 * s["prompt_tokens"] + 2.0 * s["generated_tokens"]


@pytest.mark.parametrize("policy", ["fcfs", "vtc"])
def test_vtc_bounds_service_difference_between_backlogged_clients(policy):
    """Client A keeps 4x as many requests queued as client B. Under VTC, while both are
    backlogged, the service difference stays within the paper's bound 2 * U, with
    U = max(w_in * L_in, w_out * M), M the batch's token capacity. FCFS lets A run away."""
    budget, prompt_len, max_tokens = 16, 8, 8
    sched = make(policy=policy, budget=budget, num_blocks=64, block_size=4, max_num_seqs=4)
    bound = 2 * max(1.0 * prompt_len, 2.0 * budget)
    counter = iter(range(10**6))

    def top_up(s, _=None):  # keep both clients backlogged: A with 8 waiting, B with 2
        for client, depth in (("A", 8), ("B", 2)):
            while sum(q.client == client for q in s.waiting) < depth:
                s.add(Sequence(f"{client}{next(counter)}", [3] * prompt_len, client=client))

    top_up(sched)
    diffs = []
    for _ in range(300):
        out = sched.schedule()
        for seq in update(sched, out, fake_next):
            if len(seq.output_token_ids) >= max_tokens:
                sched.finish(seq, "length")
        top_up(sched)
        diffs.append(abs(served(sched, "A") - served(sched, "B")))
    if policy == "vtc":
        assert max(diffs) <= bound
    else:
        assert diffs[-1] > 10 * bound  # FCFS serves A's 4x queue 4x as much


def test_finish_returns_pages_and_drops_waiting():
    sched = make()
    a, b = Sequence("a", [1, 2, 3]), Sequence("b", [4])
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert sched.blocks.num_used_blocks == 0 and not sched.has_unfinished()
    assert a.finish_reason == "abort" and b.status == Status.FINISHED


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lottery")


def test_decode_lookahead_reserves_pages_for_every_step_up_to_the_cap():
    sched = make(budget=8, num_blocks=16, block_size=4)
    seq = Sequence("a", [1, 2, 3], max_num_tokens=3 + 6)  # max_tokens 6
    sched.add(seq)
    update(sched, sched.schedule(lookahead=4), fake_next)  # prompt: 1 token sampled
    out = sched.schedule(lookahead=4)
    # 4 steps: positions 3..6 written, so blocks [0, 4) and [4, 8): 2 blocks.
    assert [(c.start, c.num_tokens, c.is_decode) for c in out.chunks] == [(3, 4, True)]
    assert len(sched.blocks.block_table("a")) == 2
    sched.scheduled(out)  # in flight: 4 tokens the host has not seen
    assert seq.num_inflight_tokens == 4 and seq.num_tokens == 3 + 1 + 4
    # Only 1 token is left under the cap (3 + 6): the next call plans 1 step.
    out = sched.schedule(lookahead=4)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(7, 1)]


def test_a_step_with_prompt_work_runs_its_decodes_once():
    sched = make(budget=16, num_blocks=32, block_size=4)
    sched.add(Sequence("a", [1, 2]))
    update(sched, sched.schedule(lookahead=4), fake_next)
    sched.add(Sequence("b", list(range(10))))
    out = sched.schedule(lookahead=4)
    assert [(c.seq.seq_id, c.num_tokens, c.is_decode) for c in out.chunks] == [
        ("a", 1, True),
        ("b", 10, False),
    ]


def test_a_preemption_waits_for_the_tokens_in_flight():
    sched = make(budget=8, num_blocks=2, block_size=4, max_num_seqs=2)
    a, b = Sequence("a", [1, 2, 3]), Sequence("b", [4, 5, 6])
    sched.add(a)
    sched.add(b)
    update(sched, sched.schedule(), fake_next)  # both prefilled: 1 block each, 1 token out
    # Each decode needs a second block and none is free. With calls in flight, the
    # scheduler asks for a drain instead of preempting blind.
    out = sched.schedule(lookahead=4, can_preempt=False)
    assert out.needs_drain and b.status == Status.RUNNING
    b.num_inflight_tokens = 1  # the victim's last token is still on device
    assert sched.schedule(lookahead=4).needs_drain and b.status == Status.RUNNING
    b.num_inflight_tokens = 0  # drained: now b is preempted and a gets the block
    out = sched.schedule(lookahead=4)
    assert not out.needs_drain and b.status == Status.WAITING
    assert [c.seq.seq_id for c in out.chunks] == ["a"]
