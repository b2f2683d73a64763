"""Token constraints only the host can compute, one step at a time: a grammar (structured
output) and bad words of several tokens.

Each depends on the tokens just sampled, so a sequence that has one is decoded one step per
call with no call in flight (the engine drains first): the host reads step k's token,
advances the sequence's `HostMask`, and sends step k+1's bitmask with the call (i32[S, W],
bit j of word w allows token 32 w + j; serve/sampler.py applies it on device before
sampling). Rows of other sequences stay all ones; while no sequence has a host mask, no
bitmask is built or sent and the engine runs a call ahead, as before.

One-token bad words, logit_bias and allowed_token_ids need no host: they are a bias row
kept on device (serve/sampler.py `bias_entries`).
"""

from __future__ import annotations

import numpy as np

from tandem.serve.sampling_params import SamplingParams


def bitmask_width(vocab_size: int) -> int:
    """W: 32-bit words per row."""
    return -(-vocab_size // 32)


def all_allowed(num_rows: int, vocab_size: int) -> np.ndarray:
    """i32[R, W] with every bit set (ids >= vocab_size are never logits, so harmless)."""
    return np.full((num_rows, bitmask_width(vocab_size)), -1, np.int32)


def long_bad_words(params: SamplingParams) -> list[tuple[int, ...]]:
    return [w for w in params.bad_words if len(w) > 1]


def needs_host_mask(params: SamplingParams) -> bool:
    return params.structured_output is not None or bool(long_bad_words(params))


class HostMask:
    """One sequence's constraint: a grammar matcher (or None) and bad words of 2+ tokens.

    `matcher` follows serve/structured_output.py: `fill_bitmask(bitmask, row)`,
    `accept_token(token) -> bool`, `is_terminated` (EOS accepted).
    """

    def __init__(self, matcher, bad_words: list[tuple[int, ...]], eos_ids):
        self.matcher = matcher
        self.bad_words = bad_words
        self.eos_ids = set(eos_ids)
        self.output: list[int] = []  # the tokens accepted so far
        self.failed: str | None = None

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the tokens allowed next into `bitmask[row]` (which starts all ones)."""
        if self.matcher is not None:
            self.matcher.fill_bitmask(bitmask, row)
        self.ban_bad_words(bitmask, row)

    def ban_bad_words(self, bitmask: np.ndarray, row: int) -> None:
        """Clears in `bitmask[row]` the last token of each bad word whose other tokens were
        just generated."""
        for word in self.bad_words:
            prefix = word[:-1]
            if tuple(self.output[-len(prefix) :]) == prefix:
                word_index, bit = divmod(word[-1], 32)
                # Through a uint32 view: bit 31 is int32's sign bit.
                bitmask[row].view(np.uint32)[word_index] &= ~np.uint32(1 << bit)

    def accept(self, tokens: list[int]) -> bool:
        """Advances past `tokens`; True once the grammar is complete (the sequence should
        stop). A token the grammar refuses (never sampled under its mask) sets `failed`."""
        for token in tokens:
            self.output.append(token)
            if self.matcher is None:
                continue
            if self.matcher.is_terminated:
                return True
            if not self.matcher.accept_token(token):
                self.failed = f"token {token} does not follow the request's grammar"
                return True
        return self.matcher is not None and self.matcher.is_terminated


class HostMasks:
    """Makes sequences' host masks for one engine; the grammar compiler (the grammar
    engine's tokenizer tables) is built on the first request that needs it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self._compiler = None

    def check(self, params: SamplingParams) -> None:
        """Compiles the request's grammar now (cached): ValueError naming what is wrong."""
        if params.structured_output is not None:
            self.compiler().compile(params.structured_output)

    def make(self, params: SamplingParams) -> HostMask | None:
        if not needs_host_mask(params):
            return None
        spec = params.structured_output
        matcher = None if spec is None else self.compiler().matcher(spec)
        return HostMask(matcher, long_bad_words(params), self.eos_ids)

    def fill(self, seqs, bitmask: np.ndarray) -> None:
        """Writes each sequence's allowed tokens into `bitmask[seq.slot]` (i32[S, W], all
        ones elsewhere): the grammars' rows together, on the compiler's threads."""
        matchers = [None] * len(bitmask)
        for seq in seqs:
            matchers[seq.slot] = seq.host_mask.matcher
        if any(m is not None for m in matchers):
            self.compiler().fill_bitmask(matchers, bitmask)
        for seq in seqs:
            seq.host_mask.ban_bad_words(bitmask, seq.slot)

    def compiler(self):
        if self._compiler is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer")
            from tandem.serve.structured_output import GrammarCompiler

            eos = self.eos_ids[0] if self.eos_ids else None
            self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, eos_token_id=eos)
        return self._compiler
