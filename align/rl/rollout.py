"""RL rollouts through the serving engine: groups of completions with their behaviour logprobs.

`generate` adds one request per prompt with `n = group_size`, so the engine computes each
prompt once and forks its pages for the group (copy-on-write), then steps the engine until
every completion is done. The engine reports logprobs in "scaled" mode,
log_softmax(logits / T), the distribution the tokens were drawn from (before truncation), so
that the trainer's ratio pi_theta / pi_old is 1 at step 0 whatever the temperature.

`to_batch` packs rollouts into right-padded training rows; `dynamic_sample` is DAPO's dynamic
sampling (keep generating until enough groups have rewards that are not all equal).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from tandem.serve.buckets import power_of_two_at_least
from tandem.serve.engine import Engine
from tandem.serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_call_ids = itertools.count()  # request ids unique across generate calls on one engine


@dataclasses.dataclass
class Rollouts:
    """N = num_prompts * group_size completions, row i of group `group[i]`, in prompt order
    then sample order."""

    prompt_ids: list[list[int]]  # per completion: its prompt
    completion_ids: list[list[int]]  # generated ids, the EOS / stop token included
    engine_logps: list[np.ndarray]  # f32[len(completion)] each: scaled logprob per token
    finish_reasons: list[str]  # "stop" (EOS or a stop token) or "length" (max_tokens)
    group: np.ndarray  # i32[N], index of the prompt the completion answers
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache, all generate calls
    seconds: float = 0.0  # wall time of the generate calls

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_groups(self) -> int:
        return len(np.unique(self.group))

    def select_groups(self, groups: Sequence[int]) -> Rollouts:
        """The completions of `groups`, renumbered 0..len(groups)-1 in the order given."""
        rows = [i for new, g in enumerate(groups) for i in np.flatnonzero(self.group == g)]
        renumber = {g: new for new, g in enumerate(groups)}
        return Rollouts(
            [self.prompt_ids[i] for i in rows],
            [self.completion_ids[i] for i in rows],
            [self.engine_logps[i] for i in rows],
            [self.finish_reasons[i] for i in rows],
            np.array([renumber[int(self.group[i])] for i in rows], np.int32),
            self.num_cached_tokens,
            self.seconds,
        )


def concatenate(parts: Sequence[Rollouts]) -> Rollouts:
    """One Rollouts from several, groups offset so that they stay distinct; counts and
    seconds add up."""
    groups, offset = [], 0
    for r in parts:
        groups.append(r.group + offset)
        offset += int(r.group.max()) + 1 if len(r) else 0
    return Rollouts(
        [p for r in parts for p in r.prompt_ids],
        [c for r in parts for c in r.completion_ids],
        [lp for r in parts for lp in r.engine_logps],
        [f for r in parts for f in r.finish_reasons],
        np.concatenate(groups).astype(np.int32) if groups else np.zeros(0, np.int32),
        sum(r.num_cached_tokens for r in parts),
        sum(r.seconds for r in parts),
    )


def generate(
    engine: Engine,
    prompt_ids: list[list[int]],
    *,
    group_size: int,
    max_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> Rollouts:
    """Samples `group_size` completions of every prompt with `engine`'s current params.

    The engine must be idle (this call steps it until done and would consume other
    requests' outputs). With `seed`, prompt i draws from a seed derived from (seed, i), so
    the rollouts do not depend on batching. Raises ValueError for an empty prompt list, a
    busy engine or a request the engine refuses (nothing stays queued then).
    """
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty")
    if engine.has_unfinished():
        raise ValueError("generate: the engine has unfinished requests; rollouts need it idle")
    start = time.perf_counter()
    call = next(_call_ids)
    request_ids = [f"rollout-{call}-{i}" for i in range(len(prompt_ids))]
    try:
        for i, (rid, prompt) in enumerate(zip(request_ids, prompt_ids)):
            params = SamplingParams(
                n=group_size,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=None if seed is None else derive_seed(seed, i),
                stop_token_ids=tuple(stop_token_ids or ()),
                logprobs=0,
                logprobs_mode="scaled",
            )
            engine.add_request(rid, prompt, params, stream=False)
    except Exception as e:
        for rid in request_ids:  # nothing stays queued
            engine.abort(rid)
        if isinstance(e, ValueError):
            raise ValueError(f"generate: prompt {i}: {e}") from e
        raise

    done = engine.run_until_done()
    rollouts = Rollouts([], [], [], [], np.zeros(0, np.int32))
    groups = []
    for i, rid in enumerate(request_ids):
        out = done[rid]
        rollouts.num_cached_tokens += out.num_cached_tokens
        for completion in out.outputs:  # sorted by index
            rollouts.prompt_ids.append(list(out.prompt_token_ids))
            rollouts.completion_ids.append(list(completion.token_ids))
            rollouts.engine_logps.append(
                np.array([lp.logprob for lp in completion.logprobs], np.float32)
            )
            rollouts.finish_reasons.append(completion.finish_reason)
            groups.append(i)
    rollouts.group = np.array(groups, np.int32)
    rollouts.seconds = time.perf_counter() - start
    return rollouts


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item `index` of a call seeded with `seed`; unlike seed + index, the
    seeds of (s, 1) and (s + 1, 0) are unrelated."""
    return int(np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)[0] >> 1)


def to_batch(
    rollouts: Rollouts, *, pad_id: int, max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Right-padded training rows, T = max_length, or the longest row rounded up to a power
    of two (>= 16) so that the train step compiles for few shapes:

      tokens            i32[N, T]  prompt + completion + pad_id
      completion_mask   f32[N, T]  1 at completion tokens (EOS included), else 0
      engine_logps      f32[N, T]  the engine's logprob of the token AT that position
                                   (predicted by the logits one position earlier), 0 elsewhere
      prompt_lengths    i32[N],  completion_lengths i32[N]
      has_eos           bool[N]    the completion ended itself (EOS or a stop token), i.e.
                                   was not truncated at max_tokens
      group             i32[N]

    Raises ValueError if a row is longer than max_length.
    """
    lengths = [len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
    longest = max(lengths, default=1)
    if max_length is None:
        max_length = power_of_two_at_least(longest, 16)
    elif longest > max_length:
        row = next(i for i, n in enumerate(lengths) if n > max_length)
        raise ValueError(
            f"to_batch: row {row} has {lengths[row]} tokens "
            f"({len(rollouts.prompt_ids[row])} prompt + {len(rollouts.completion_ids[row])} "
            f"completion), more than max_length={max_length}"
        )
    n = len(rollouts)
    tokens = np.full((n, max_length), pad_id, np.int32)
    mask = np.zeros((n, max_length), np.float32)
    logps = np.zeros((n, max_length), np.float32)
    for i, (prompt, completion, lp) in enumerate(
        zip(rollouts.prompt_ids, rollouts.completion_ids, rollouts.engine_logps)
    ):
        p, c = len(prompt), len(completion)
        tokens[i, :p] = prompt
        tokens[i, p : p + c] = completion
        mask[i, p : p + c] = 1.0
        logps[i, p : p + c] = lp
    return {
        "tokens": tokens,
        "completion_mask": mask,
        "engine_logps": logps,
        "prompt_lengths": np.array([len(p) for p in rollouts.prompt_ids], np.int32),
        "completion_lengths": np.array([len(c) for c in rollouts.completion_ids], np.int32),
        "has_eos": np.array([f == "stop" for f in rollouts.finish_reasons], bool),
        "group": rollouts.group.astype(np.int32),
    }


@dataclasses.dataclass
class PromptBatch:
    """Prompts to roll out and their dataset columns (e.g. `answer`), one entry per prompt."""

    prompt_ids: list[list[int]]
    columns: dict[str, list] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DynamicSample:
    rollouts: Rollouts  # the kept groups, renumbered 0..num_groups-1
    rewards: np.ndarray  # f32[N] of the kept completions
    columns: dict[str, list]  # per kept completion
    num_tries: int  # generate calls made
    num_dropped_groups: int  # groups whose rewards were all equal


# (rollouts, columns with one entry per completion) -> rewards f32[N], NaN for "no reward"
RolloutReward = Callable[[Rollouts, dict[str, list]], Sequence[float]]


def dynamic_sample(
    engine: Engine,
    prompt_batches: Iterable[PromptBatch],
    reward_fn: RolloutReward,
    *,
    num_groups: int,
    max_tries: int,
    seed: int | None = None,
    **generate_kwargs,
) -> DynamicSample:
    """DAPO dynamic sampling: draws batches from `prompt_batches`, generates and scores them,
    drops groups whose rewards are all equal (their group-normalised advantage is 0: no
    gradient), until `num_groups` groups are kept; extra groups of the last batch are
    dropped. NaN rewards are ignored when comparing; an all-NaN group is dropped too.

    When `max_tries` generate calls (or the batches) run out first, it returns the groups it
    has, possibly fewer than num_groups or none, and logs a warning with the counts.
    `generate_kwargs` go to `generate` (group_size, max_tokens, temperature, ...); with
    `seed`, try t uses derive_seed(seed, t).
    """
    if num_groups < 1 or max_tries < 1:
        raise ValueError(f"num_groups and max_tries must be >= 1, got {num_groups}, {max_tries}")
    kept: list[Rollouts] = []
    rewards: list[np.ndarray] = []
    columns: dict[str, list] = {}
    num_kept = num_tries = num_dropped = 0
    batches = iter(prompt_batches)
    while num_kept < num_groups and num_tries < max_tries:
        batch = next(batches, None)
        if batch is None:
            break
        seed_t = None if seed is None else derive_seed(seed, num_tries)
        rollouts = generate(engine, batch.prompt_ids, seed=seed_t, **generate_kwargs)
        num_tries += 1
        per_completion = _expand(batch.columns, rollouts.group, len(batch.prompt_ids))
        r = np.asarray(reward_fn(rollouts, per_completion), np.float32)
        if r.shape != (len(rollouts),):
            raise ValueError(f"reward_fn returned shape {r.shape}, expected ({len(rollouts)},)")
        informative = [g for g in range(len(batch.prompt_ids)) if _varies(r[rollouts.group == g])]
        num_dropped += len(batch.prompt_ids) - len(informative)
        informative = informative[: num_groups - num_kept]
        num_kept += len(informative)
        rows = np.concatenate([np.flatnonzero(rollouts.group == g) for g in informative] or [[]])
        rows = rows.astype(np.int64)
        kept.append(rollouts.select_groups(informative))
        rewards.append(r[rows])
        for k, v in per_completion.items():
            columns.setdefault(k, []).extend(v[i] for i in rows)
    if num_kept < num_groups:
        logger.warning(
            "dynamic sampling: kept %d of %d groups after %d tries (%d dropped as all-equal)",
            num_kept,
            num_groups,
            num_tries,
            num_dropped,
        )
    return DynamicSample(
        concatenate(kept),
        np.concatenate(rewards) if rewards else np.zeros(0, np.float32),
        columns,
        num_tries,
        num_dropped,
    )


def _varies(group_rewards: np.ndarray) -> bool:
    finite = group_rewards[~np.isnan(group_rewards)]
    return finite.size >= 2 and bool(finite.max() > finite.min())


def _expand(columns: dict[str, list], group: np.ndarray, num_prompts: int) -> dict[str, list]:
    """Per-prompt columns -> per-completion columns, by `group`."""
    for k, v in columns.items():
        if len(v) != num_prompts:
            raise ValueError(f"column {k!r} has {len(v)} entries for {num_prompts} prompts")
    return {k: [v[int(g)] for g in group] for k, v in columns.items()}
