"""Grammars for the engine: a `StructuredOutput` (JSON schema, json_object, regex, choice,
Lark or EBNF grammar) compiled once against the tokenizer, one matcher per sequence that
writes the allowed next tokens as a bitmask, and the jitted op that applies it to logits.

Built on llguidance (`tandem bench grammar_mask`): it has no dependencies, where xgrammar
requires torch and triton (gigabytes on a GPU node, with CUDA libraries beside JAX's) and
takes 8 s to import. Its serial mask is 3-9x slower than xgrammar's, so `GrammarCompiler.
fill_bitmask` fills a batch's rows on llguidance's thread pool.

Bitmask layout (llguidance's and xgrammar's): `i32[B, ceil(V/32)]`, bit j of word w says
whether token 32 * w + j may be sampled. Rows are filled on the host (numpy) and applied on
the device inside the sampler's jit.

EOS: once the text is complete and nothing may follow, a row allows only the EOS id; a
grammar that may stop or go on allows both. The tokenizer's `eos_token_id` is used unless
one is passed; with neither, `GrammarCompiler` raises ValueError, since a matcher could
never let a sequence end. Accepting EOS terminates the matcher here (llguidance does not
record an EOS it takes after the end, so rollback would skip it). Vocab padding: ids in
[len(tokenizer), vocab_size) (the model's embedding is often padded to a multiple of 64 or
128) and special tokens other than EOS are never allowed: every row is ANDed with a fixed
mask, since a Lark grammar may name a special token (`<|bos|>`, `<[258]>`), and such ids are
refused before llguidance sees them (consuming one puts its matcher in an error state).

JSON is compact, with json.dumps's separators (`{"a": 1, "b": [2, 3]}`) and no other
whitespace (llguidance's options, which a schema's "x-guidance" cannot override): no
whitespace loops, and the style models write anyway. As in vLLM, properties a schema does
not list are not generated (an object schema with properties gets `additionalProperties:
false` unless it says otherwise, as vLLM does for llguidance; items past `prefixItems` get
`items: false`) except for json_object. llguidance refuses the keywords it does not
implement ("Unimplemented keys": not, if/then/else, uniqueItems, contains, propertyNames,
dependentRequired, unevaluatedProperties, $dynamicRef, ...) and unknown formats; the
validation keywords it accepts it enforces (checked on 1.9.1 with random walks: multipleOf,
min/maxProperties, additionalItems, patternProperties, formats), so none is refused here.

A grammar is Lark (llguidance's native dialect) unless it has "::=" and no `start:` rule:
then it is GBNF (llama.cpp's EBNF, which vLLM accepts), converted by llguidance's
`gbnf_to_lark`; its start rule is `root`.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence

import jax.numpy as jnp
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from tandem.serve.sampling_params import StructuredOutput

JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,  # refuse unimplemented keywords (the schema cannot turn this off)
}


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """i32[B, ceil(V/32)], all bits set: every token allowed until a matcher fills a row."""
    return np.full((batch, bitmask_width(vocab_size)), -1, np.int32)


def apply_bitmask(logits: jnp.ndarray, bitmask: jnp.ndarray) -> jnp.ndarray:
    """f32[B, V], i32[B, ceil(V/32)] -> f32[B, V] with disallowed ids at -inf. Pure JAX, for
    use inside jit: one shift-and-mask per bit, no gather."""
    num_rows, vocab_size = logits.shape
    if bitmask.shape != (num_rows, bitmask_width(vocab_size)):
        raise ValueError(
            f"bitmask shape {bitmask.shape} does not fit logits {logits.shape}: "
            f"want ({num_rows}, {bitmask_width(vocab_size)})"
        )
    # [B, W, 32]: arithmetic >> on int32 keeps bit 31 readable with & 1.
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    is_allowed = bits.reshape(num_rows, -1)[:, :vocab_size] == 1  # [B, V]
    return jnp.where(is_allowed, logits, -jnp.inf)


def apply_bitmask_numpy(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """The numpy twin of `apply_bitmask` (tests, host-side checks); returns a copy."""
    num_rows, vocab_size = logits.shape
    bits = np.unpackbits(bitmask.astype("<i4").view(np.uint8), axis=1, bitorder="little")
    return np.where(bits[:, :vocab_size] == 1, logits, -np.inf).astype(logits.dtype)


class GrammarMatcher:
    """One sequence's position in its grammar. Rolls back up to any number of tokens."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int, text_mask: np.ndarray):
        self._matcher = matcher
        self.eos_token_id = eos_token_id
        self._text_mask = text_mask  # i32[ceil(V/32)]: see the module docstring
        self._is_terminated = False

    @property
    def is_terminated(self) -> bool:
        """True once EOS was accepted: the sequence is finished."""
        return self._is_terminated

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]` (i32[B, ceil(V/32)])."""
        if self._is_terminated:
            _fill_eos_only(bitmask, row, self.eos_token_id)
        else:
            llguidance.numpy.fill_next_token_bitmask(self._matcher, bitmask, row)
            bitmask[row] &= self._text_mask

    def accept_token(self, token_id: int) -> bool:
        """Advances by one token; False (and no change) if the grammar does not allow it."""
        if self._is_terminated or not 0 <= token_id < 32 * len(self._text_mask):
            return False
        if token_id == self.eos_token_id:
            self._is_terminated = self._matcher.is_accepting()
            return self._is_terminated
        if not (int(self._text_mask[token_id // 32]) >> (token_id % 32)) & 1:
            return False
        return self._matcher.try_consume_tokens([token_id]) == 1

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Advances by several tokens (a draft, a forced prefix); stops at the first one not
        allowed. Returns how many were accepted."""
        for n, t in enumerate(token_ids):
            if not self.accept_token(t):
                return n
        return len(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        if num_tokens > 0 and self._is_terminated:
            self._is_terminated = False
            num_tokens -= 1
        if num_tokens > 0 and not self._matcher.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self._matcher.get_error()}")


def _fill_eos_only(bitmask: np.ndarray, row: int, eos_token_id: int) -> None:
    bitmask[row] = 0
    bitmask[row].view(np.uint32)[eos_token_id // 32] = 1 << (eos_token_id % 32)


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer and model vocab size, keeping the last
    `cache_size` compiled grammars (a compiled JSON schema takes 1-100 ms, see the bench)."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        *,
        eos_token_id: int | None = None,
        max_threads: int = 8,
        cache_size: int = 256,
    ):
        """`tokenizer`: a `transformers.PreTrainedTokenizerFast` (byte-level BPE, byte-
        fallback sentencepiece, or tandem's byte tokenizer). `vocab_size`: the model's, >=
        len(tokenizer). `max_threads`: the batched fill's thread pool."""
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if eos is None:
            raise ValueError(
                "structured output needs an EOS token id: the tokenizer has none, pass "
                "eos_token_id (a finished grammar allows only EOS)"
            )
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} < tokenizer length {len(tokenizer)}")
        if not 0 <= eos < vocab_size:
            raise ValueError(f"eos_token_id {eos} is outside the vocabulary [0, {vocab_size})")
        self.eos_token_id = eos
        self.vocab_size = vocab_size
        try:
            self._tokenizer = llguidance.hf.from_tokenizer(
                tokenizer, n_vocab=vocab_size, eos_token=eos
            )
        except ValueError as e:
            raise ValueError(f"structured output: {e} (got {type(tokenizer).__name__})") from None
        is_text = np.zeros(32 * bitmask_width(vocab_size), bool)
        is_text[: len(tokenizer)] = True
        is_text[list(set(tokenizer.all_special_ids))] = False
        is_text[eos] = True
        self.text_mask = np.packbits(is_text, bitorder="little").view(np.int32)
        self._executor = llguidance.LLExecutor(num_threads=max_threads)
        self._cache: collections.OrderedDict[StructuredOutput, llguidance.LLMatcher] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled grammar for `spec`, cached: a matcher at its start that is never
        advanced (`matcher` copies it). Raises ValueError naming the problem."""
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        try:
            grammar = _grammar(spec)
        except ValueError as e:
            raise ValueError(f"structured output ({spec.kind}): {e}") from None
        compiled = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if compiled.is_error():
            raise ValueError(f"structured output ({spec.kind}): {compiled.get_error().strip()}")
        self._cache[spec] = compiled
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A new sequence's matcher, at the start of `spec`'s grammar."""
        return GrammarMatcher(self.compile(spec).deep_copy(), self.eos_token_id, self.text_mask)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher | None], bitmask: np.ndarray):
        """Fills row i of `bitmask` (i32[B, ceil(V/32)], C-contiguous, B >= len(matchers))
        from matchers[i] on the compiler's threads; a None row allows every token."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated]
        if rows:
            pairs = [(matchers[i]._matcher, i) for i in rows]
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, bitmask)
            bitmask[rows] &= self.text_mask
        for i, m in enumerate(matchers):
            if m is None:
                bitmask[i] = -1
            elif m.is_terminated:
                _fill_eos_only(bitmask, i, self.eos_token_id)


def _grammar(spec: StructuredOutput) -> str:
    """`spec` as an llguidance grammar (a string the LLMatcher constructor validates)."""
    kind = spec.kind
    if kind == "json":
        try:
            schema = json.loads(spec.json)
        except json.JSONDecodeError as e:
            raise ValueError(f"json schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"json schema must be an object, got {type(schema).__name__}")
        _close_objects(schema)  # a fresh copy: json.loads
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, overrides=JSON_OPTIONS
        )
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", list(spec.choice))
    lark = spec.grammar
    if "::=" in lark:
        try:
            lark = any_to_lark(lark)  # unchanged if it has a `start:` rule (Lark)
        except Exception as e:  # the converter raises its own error types
            raise ValueError(f"GBNF grammar: {e}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


# Where subschemas sit, for the walk that closes objects (a property called "properties" is
# a name, not a keyword).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else")


def _close_objects(schema) -> None:
    """In place: `additionalProperties: false` on object schemas that list properties and
    `items: false` after `prefixItems`, unless the schema says otherwise (module docstring)."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for sub in value.values():
                _close_objects(sub)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for sub in value:
                _close_objects(sub)
        elif key in _SCHEMAS:
            _close_objects(value)
    if "properties" in schema or "patternProperties" in schema:
        schema.setdefault("additionalProperties", False)
    if "prefixItems" in schema:
        schema.setdefault("items", False)
