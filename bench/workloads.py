"""Offline workloads for `bench engine_e2e` and its peers: how long each prompt is and how
many tokens each sequence must produce (`ignore_eos`), with the token ids drawn apart.

Lengths are fixed once per run (a seeded numpy rng); each pass draws fresh prompt tokens of
those lengths, so a warm-up pass never fills the prefix cache for the timed one.

Plain Python and numpy (never jax): the HF peer reads a workload without touching a GPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np

WORKLOADS = ("fixed", "nanovllm")

# nano-vllm's bench.py: 256 sequences, `randint(100, 1024)` input and output lengths,
# prompt tokens `randint(0, 10000)` (inclusive bounds), temperature 0.6, ignore_eos.
NANOVLLM_NUM_SEQS = 256
NANOVLLM_MIN_LEN = 100
NANOVLLM_MAX_LEN = 1024
NANOVLLM_NUM_TOKEN_IDS = 10001


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    input_lens: tuple[int, ...]
    """Prompt length of each sequence, in tokens."""
    output_lens: tuple[int, ...]
    """Tokens each sequence must produce (its own `max_tokens`; EOS does not stop it)."""
    num_token_ids: int | None = None
    """Prompt tokens are uniform in [0, num_token_ids), clipped to the vocab; None: the vocab."""

    @property
    def num_seqs(self) -> int:
        return len(self.input_lens)

    @property
    def num_input_tokens(self) -> int:
        return sum(self.input_lens)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_model_len(self) -> int:
        """The longest sequence, prompt and output together."""
        return max(i + o for i, o in zip(self.input_lens, self.output_lens))

    def prompts(self, rng: np.random.Generator, vocab_size: int) -> list[list[int]]:
        """Fresh random token ids with this workload's prompt lengths."""
        high = min(vocab_size, self.num_token_ids or vocab_size)
        return [rng.integers(0, high, size=n).tolist() for n in self.input_lens]


def fixed_workload(num_seqs: int, input_len: int, output_len: int) -> Workload:
    """vLLM's `bench throughput`: every prompt `input_len` tokens, every output `output_len`."""
    return Workload("fixed", (input_len,) * num_seqs, (output_len,) * num_seqs)


def nanovllm_workload(seed: int = 0, num_seqs: int = NANOVLLM_NUM_SEQS) -> Workload:
    """nano-vllm's bench.py with a seeded numpy rng in place of Python's `random`: input
    and output lengths each uniform in [100, 1024], both bounds included."""
    rng = np.random.default_rng(seed)
    lo, hi = NANOVLLM_MIN_LEN, NANOVLLM_MAX_LEN
    input_lens = rng.integers(lo, hi + 1, size=num_seqs).tolist()
    output_lens = rng.integers(lo, hi + 1, size=num_seqs).tolist()
    return Workload("nanovllm", tuple(input_lens), tuple(output_lens), NANOVLLM_NUM_TOKEN_IDS)
