"""Per-request sampling parameters (vLLM/OpenAI semantics) and host-side stop-string search.

Plain Python, no jax: the HTTP layer validates a request by building `SamplingParams`, and a
`ValueError` names the offending field so it can become a 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# OpenAI caps `logprobs` at 20 alternatives; vLLM's default `max_logprobs` is the same.
MAX_LOGPROBS = 20

# What `SamplingParams.logprobs` reports. "raw" (vLLM's default, raw_logprobs):
# log_softmax of the model's logits, the model's own distribution. "scaled":
# log_softmax(logits / temperature), the policy a token was sampled from before penalties
# and top-k/top-p/min-p truncation, which is what TRL recomputes in training. RL needs
# "scaled": at temperature != 1 raw logprobs make importance ratios pi_new / pi_old wrong.
LOGPROBS_MODES = ("raw", "scaled")

# OpenAI's logit_bias range.
MAX_LOGIT_BIAS = 100.0

# Temperatures below this are greedy, as in vLLM: dividing logits by a near-zero
# temperature only turns sampling into a numerically fragile argmax.
GREEDY_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a completion must match (vLLM's structured outputs): exactly one field set.
    Kept hashable: a schema is its JSON text, choices a tuple."""

    json: str | None = None
    """A JSON schema, as JSON text (`json.dumps` of the schema object)."""
    json_object: bool = False
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    regex: str | None = None
    """The whole completion matches this regular expression."""
    choice: tuple[str, ...] | None = None
    """The completion is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar: Lark, or EBNF (GBNF) as vLLM accepts it."""

    def __post_init__(self):
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        kinds = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        kinds += ["json_object"] if self.json_object else []
        if len(kinds) != 1:
            raise ValueError(
                "structured output takes exactly one of json, json_object, regex, choice, "
                f"grammar; got {kinds or 'none'}"
            )
        for k in ("json", "regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured output: {k} must be a non-empty string")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                "structured output: choice must be a non-empty list of non-empty strings"
            )

    @property
    def kind(self) -> str:
        return next(
            k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k)
        )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to turn one request's logits into tokens, and when to stop."""

    n: int = 1
    """Independent completions for the prompt."""
    max_tokens: int = 16
    """Most tokens to generate per completion (>= 1)."""
    temperature: float = 1.0
    """Logits are divided by it before sampling; 0 (below GREEDY_EPS) means greedy argmax."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass is >= top_p, in (0, 1]."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    repetition_penalty: float = 1.0
    """> 0. HF/vLLM: a logit of a token seen in the prompt or the output is divided by it
    when positive and multiplied by it when negative."""
    presence_penalty: float = 0.0
    """In [-2, 2]. OpenAI: subtracted once from a token's logit if it occurs in the output."""
    frequency_penalty: float = 0.0
    """In [-2, 2]. OpenAI: subtracted per occurrence of the token in the output."""
    seed: int | None = None
    """Makes sampling reproducible: a token's randomness depends only on the seed, the
    completion's index among n and the token's index, never on the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings (a str or list is accepted and stored as a tuple)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the completion, besides EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0..MAX_LOGPROBS);
    None returns none."""
    prompt_logprobs: int | None = None
    """As `logprobs`, for every prompt token."""
    logprobs_mode: str = "raw"
    """What `logprobs` and `prompt_logprobs` report, one of LOGPROBS_MODES: "raw" is
    log_softmax(logits); "scaled" is log_softmax(logits / temperature) over the full
    vocabulary, after temperature but before penalties and truncation (what a trainer
    recomputes from its own forward). Greedy rows report raw logprobs in both modes."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    skip_special_tokens: bool = True
    """Detokenize without special tokens."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling, bias in [-100, 100]
    (OpenAI's; a dict {id: bias} is accepted and stored sorted as pairs)."""
    min_tokens: int = 0
    """EOS and stop token ids cannot be sampled before this many tokens (vLLM's; HF's
    min_new_tokens). Stop strings still apply."""
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token id sequences never generated (vLLM's bad_words, tokenized by the caller):
    the last token of each is banned whenever the tokens before it were just generated."""
    allowed_token_ids: tuple[int, ...] | None = None
    """Only these token ids may be sampled (vLLM's)."""
    structured_output: StructuredOutput | None = None
    """A grammar the completion must follow (JSON schema, regex, choice, CFG)."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        if isinstance(bias, dict):
            bias = bias.items()
        object.__setattr__(self, "logit_bias", tuple(sorted((t, b) for t, b in bias)))
        object.__setattr__(self, "bad_words", tuple(tuple(w) for w in self.bad_words))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))

        _check_int("n", self.n, lo=1)
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_range("temperature", self.temperature, lo=0.0)
        if not (_is_int(self.top_k) and (self.top_k >= 1 or self.top_k in (0, -1))):
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {self.top_k!r}")
        _check_range("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_range("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_range("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _check_range("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_range("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids must hold ints >= 0, got {t!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hi=MAX_LOGPROBS)
        for t, b in self.logit_bias:
            if not _is_int(t) or t < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {t!r}")
            _check_range(f"logit_bias[{t}]", b, lo=-MAX_LOGIT_BIAS, hi=MAX_LOGIT_BIAS)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for w in self.bad_words:
            if not w or not all(_is_int(t) and t >= 0 for t in w):
                raise ValueError(f"bad_words must hold non-empty token id lists, got {list(w)!r}")
        if self.allowed_token_ids is not None and (
            not self.allowed_token_ids
            or not all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)
        ):
            raise ValueError("allowed_token_ids must be a non-empty list of token ids (ints >= 0)")
        if self.structured_output is not None and not isinstance(
            self.structured_output, StructuredOutput
        ):
            raise ValueError("structured_output must be a StructuredOutput")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(
                f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def logprob_temperature(self) -> float:
        """Divides the logits before log_softmax for the reported logprobs: the
        temperature in "scaled" mode (1 for greedy rows, whose policy is the argmax), else 1."""
        return self.temperature if self.logprobs_mode == "scaled" and not self.is_greedy else 1.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def check_token_ids(self, vocab_size: int) -> None:
        """Raises ValueError naming the field whose token id is outside [0, vocab_size)."""
        fields = {
            "logit_bias": [t for t, _ in self.logit_bias],
            "stop_token_ids": list(self.stop_token_ids),
            "bad_words": [t for w in self.bad_words for t in w],
            "allowed_token_ids": list(self.allowed_token_ids or ()),
        }
        for name, ids in fields.items():
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(
                    f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})"
                )

    @property
    def max_stop_len(self) -> int:
        """Longest stop string. A streaming engine holds back the last max_stop_len - 1
        characters, which may be the start of a stop string the next token completes."""
        return max((len(s) for s in self.stop), default=0)


def find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """Index in `text` where the earliest stop string begins, or None.

    `text[start:]` is new since the last call, so only matches that end after `start`
    are looked for: each stop string is searched from `start - len(s) + 1`, which also
    finds a stop string split across the old and the new text. Ties at one index go to
    the shorter string.
    """
    span = find_stop_span(text, stop, start)
    return None if span is None else span[0]


def find_stop_span(text: str, stop: Sequence[str], start: int) -> tuple[int, int] | None:
    """(begin, end) of the earliest stop string, as `find_stop`; `text[:end]` keeps it
    (include_stop_str_in_output), `text[:begin]` drops it."""
    best = None
    for s in stop:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or (i, i + len(s)) < best):
            best = (i, i + len(s))
    return best


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_int(name: str, x, *, lo: int, hi: int | None = None):
    if not _is_int(x) or x < lo or (hi is not None and x > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be an int {bound}, got {x!r}")


def _check_range(name: str, x, *, lo: float, hi: float | None = None, lo_open: bool = False):
    ok = isinstance(x, int | float) and not isinstance(x, bool) and x == x  # x == x: not NaN
    ok = ok and (x > lo if lo_open else x >= lo) and (hi is None or x <= hi)
    if not ok:
        left = "(" if lo_open else "["
        bound = f"> {lo}" if hi is None and lo_open else f">= {lo}" if hi is None else ""
        bound = bound or f"in {left}{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {x!r}")
