"""Grammars for the engine: a `StructuredOutput` (JSON schema, json_object, regex, choice,
Lark or EBNF grammar) compiled once against the tokenizer, one matcher per sequence that
writes the allowed next tokens as a bitmask, and the jitted op that applies it to logits.

Built on xgrammar, chosen by `tandem bench grammar_mask` (per-step mask time for 128
sequences over a 128k vocabulary, then compile time, coverage, packaging).

Bitmask layout (xgrammar's and llguidance's): `i32[B, ceil(V/32)]`, bit j of word w says
whether token 32 * w + j may be sampled. Rows are filled on the host (numpy) and applied on
the device inside the sampler's jit.

EOS: once the text is complete and nothing may follow, a row allows only the EOS id; a
grammar that may stop or go on allows both. The tokenizer's `eos_token_id` is used unless
one is passed; with neither, `GrammarCompiler` raises ValueError, since a matcher could
never let a sequence end. Vocab padding: ids in [len(tokenizer), vocab_size) (the model's
embedding is often padded to a multiple of 64 or 128) and special tokens other than EOS
are never allowed.

JSON is compact, with json.dumps's separators (`{"a": 1, "b": [2, 3]}`) and no other
whitespace: no whitespace loops, and the style models write anyway. As in vLLM, properties
a schema does not list are not generated (xgrammar's strict mode) except for json_object.
Schema keywords xgrammar would silently ignore (UNSUPPORTED_KEYWORDS) are refused. A
grammar with "::=" is EBNF (GBNF); any other is Lark, translated by `lark_to_ebnf` as vLLM
does for xgrammar.

xgrammar 0.2.9 gaps, closed here by ANDing each filled row with a fixed mask (and refusing
the same ids in `accept_token`): it lets special tokens it does not recognise as special
(the byte tokenizer's <|bos|>) stand for their text, and lets JSON strings with
minLength/maxLength hold raw control characters, which JSON forbids.
"""

from __future__ import annotations

import ast
import collections
import json
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import xgrammar as xgr

from tandem.serve.sampling_params import StructuredOutput

JSON_SEPARATORS = (", ", ": ")


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


def _clean_error(e: Exception) -> str:
    """xgrammar's C++ errors start with '[time] /path/file.cc:line: '; drop that prefix."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip()).strip()


class GrammarMatcher:
    """One sequence's position in its grammar. Rolls back up to any number of tokens."""

    def __init__(self, compiled, eos_token_id: int, vocab_size: int, and_mask: np.ndarray):
        self._matcher = xgr.GrammarMatcher(compiled)
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size
        self._and_mask = and_mask  # i32[ceil(V/32)]: see GrammarCompiler.text_mask

    @property
    def is_terminated(self) -> bool:
        """True once EOS was accepted: the sequence is finished."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into `bitmask[row]` (i32[B, ceil(V/32)])."""
        if self.is_terminated:
            _fill_eos_only(bitmask, row, self.eos_token_id)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)
            bitmask[row] &= self._and_mask

    def accept_token(self, token_id: int) -> bool:
        """Advances by one token; False (and no change) if the grammar does not allow it."""
        if not 0 <= token_id < self.vocab_size or self.is_terminated:
            return False
        if not (int(self._and_mask[token_id // 32]) >> (token_id % 32)) & 1:
            return False
        return self._matcher.accept_token(token_id)

    def accept_tokens(self, token_ids: Sequence[int]) -> int:
        """Advances by several tokens (a draft, a forced prefix); stops at the first one not
        allowed. Returns how many were accepted."""
        for n, t in enumerate(token_ids):
            if not self.accept_token(t):
                return n
        return len(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (rejected speculative tokens)."""
        self._matcher.rollback(num_tokens)


def _fill_eos_only(bitmask: np.ndarray, row: int, eos_token_id: int) -> None:
    bit = 1 << (eos_token_id % 32)
    bitmask[row] = 0
    bitmask[row, eos_token_id // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit


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
        len(tokenizer)."""
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
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=[eos]
        )
        # The masks every row is ANDed with (module docstring): no padding, no special token
        # but EOS; for JSON also no token with a byte < 0x20 (compact JSON has none).
        num_bits = 32 * bitmask_width(vocab_size)
        is_text = np.zeros(num_bits, bool)
        is_text[: len(tokenizer)] = True
        is_text[list(set(tokenizer.all_special_ids))] = False
        is_json = is_text.copy()
        is_json[: len(info.decoded_vocab)] &= [
            not any(b < 0x20 for b in t) for t in info.decoded_vocab
        ]
        is_text[eos] = is_json[eos] = True
        self.text_mask = np.packbits(is_text, bitorder="little").view(np.int32)
        self.json_mask = np.packbits(is_json, bitorder="little").view(np.int32)
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=max_threads)
        self._cache: collections.OrderedDict[StructuredOutput, xgr.CompiledGrammar] = (
            collections.OrderedDict()
        )
        self._cache_size = cache_size

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar for `spec`, cached. Raises ValueError naming the problem."""
        if spec in self._cache:
            self._cache.move_to_end(spec)
            return self._cache[spec]
        compiled = self._compile(spec)
        self._cache[spec] = compiled
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A new sequence's matcher, at the start of `spec`'s grammar."""
        is_json = spec.kind in ("json", "json_object")
        and_mask = self.json_mask if is_json else self.text_mask
        return GrammarMatcher(self.compile(spec), self.eos_token_id, self.vocab_size, and_mask)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher | None], bitmask: np.ndarray):
        """Fills row i of `bitmask` (i32[B, ceil(V/32)], B >= len(matchers)) from
        matchers[i] on the compiler's threads; a None row allows every token."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated]
        if rows:
            handles = [matchers[i]._matcher for i in rows]
            self._batch.batch_fill_next_token_bitmask(handles, bitmask, rows)
            for i in rows:
                bitmask[i] &= matchers[i]._and_mask
        for i, m in enumerate(matchers):
            if m is None:
                bitmask[i] = -1
            elif m.is_terminated:
                _fill_eos_only(bitmask, i, self.eos_token_id)

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        c = self._compiler
        kind = spec.kind
        try:
            if kind == "json":
                try:
                    schema = json.loads(spec.json)
                except json.JSONDecodeError as e:
                    raise ValueError(f"json schema is not valid JSON: {e}") from None
                if not isinstance(schema, dict):
                    raise ValueError(f"json schema must be an object, got {type(schema).__name__}")
                _check_keywords(schema, "#")
                return c.compile_json_schema(
                    spec.json, any_whitespace=False, separators=JSON_SEPARATORS
                )
            if kind == "json_object":
                return c.compile_json_schema(
                    '{"type": "object"}',
                    any_whitespace=False,
                    separators=JSON_SEPARATORS,
                    strict_mode=False,
                )
            if kind == "regex":
                return c.compile_regex(spec.regex)
            if kind == "choice":
                alternatives = " | ".join(_ebnf_string(s) for s in spec.choice)
                return c.compile_grammar(f"root ::= {alternatives}")
            if "::=" in spec.grammar:
                return c.compile_grammar(spec.grammar)
            ebnf = lark_to_ebnf(spec.grammar)
            try:
                return c.compile_grammar(ebnf)
            except RuntimeError as e:
                raise ValueError(f"{_clean_error(e)} (Lark translated to EBNF:\n{ebnf})") from None
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"structured output ({kind}): {_clean_error(e)}") from None
        except ValueError as e:
            raise ValueError(f"structured output ({kind}): {e}") from None


# Keywords xgrammar accepts but does not enforce (0.2.9): a schema using them is refused
# rather than answered with output that may not validate.
UNSUPPORTED_KEYWORDS = frozenset(
    "not if then else uniqueItems contains minContains maxContains dependentRequired "
    "dependentSchemas dependencies".split()
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMAS = ("items", "additionalProperties", "propertyNames", "additionalItems")


def _check_keywords(schema, path: str) -> None:
    """Raises ValueError at the first keyword in UNSUPPORTED_KEYWORDS, naming its path.
    Walks only subschemas: a property called "not" is fine."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        if key in UNSUPPORTED_KEYWORDS:
            raise ValueError(f"json schema keyword {key!r} at {path} is not supported")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                _check_keywords(sub, f"{path}/{key}/{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                _check_keywords(sub, f"{path}/{key}/{i}")
        elif key in _SCHEMAS:
            _check_keywords(value, f"{path}/{key}")


def _ebnf_string(s: str) -> str:
    # EBNF string literals take JSON's escapes; non-ASCII stays as it is.
    return json.dumps(s, ensure_ascii=False)


_LARK_RULE = re.compile(r"^\s*[?!]?([A-Za-z_]\w*)(?:\.-?\d+)?\s*:(?!:)(.*)$")
_LARK_TOKEN = re.compile(
    r"""(?P<ws>\s+)
    | (?P<string>"(?:\\.|[^"\\])*"i?|'(?:\\.|[^'\\])*'i?)
    | (?P<regex>/(?:\\.|[^/\\])+/[imslux]*)
    | (?P<name>[A-Za-z_]\w*)
    | (?P<alias>->)
    | (?P<range>\.\.)
    | (?P<num>\d+)
    | (?P<op>[|()*+?~\[\]])""",
    re.X,
)


def lark_to_ebnf(lark: str) -> str:
    """Translates a Lark grammar to xgrammar's EBNF. Covered: rules and terminals
    (`name: ...`, `?name`, `NAME.2`), `|` (also at the start of a continuation line),
    "strings" and 'strings', /regex/ terminals, `"a".."z"`, ( ), [ ], * + ?, `~ n` and
    `~ n..m`, // comments. The start rule is `start`, else the first. Not covered (raise
    ValueError): %import/%ignore and other directives, case-insensitive literals,
    regex flags, aliases (`->`)."""
    rules: dict[str, list[str]] = {}
    name = None
    for num, line in enumerate(lark.splitlines(), 1):
        line = re.sub(r"(^|\s)//.*$", "", line).rstrip()
        if not line.strip():
            continue
        if line.lstrip().startswith("%"):
            raise ValueError(f"lark line {num}: directive {line.split()[0]!r} is not supported")
        m = _LARK_RULE.match(line)
        if m:
            name = m.group(1)
            rules.setdefault(name, []).append(m.group(2))
        elif name is not None and line.lstrip().startswith("|"):
            rules[name].append(line)
        else:
            raise ValueError(f"lark line {num}: expected 'name: ...' or '| ...', got {line!r}")
    if not rules:
        raise ValueError("lark grammar defines no rules")
    start = "start" if "start" in rules else next(iter(rules))
    extra: list[str] = []
    out = [f"root ::= {_lark_name(start)}"]
    for rule, parts in rules.items():
        body = _lark_body(" ".join(parts), _lark_name(rule), extra)
        out.append(f"{_lark_name(rule)} ::= {body}")
    return "\n".join(out + extra)


def _lark_name(name: str) -> str:
    return "lark_root" if name.lstrip("?!") == "root" else name.lstrip("?!")


def _lark_body(text: str, rule: str, extra: list[str]) -> str:
    """One rule's expansions in EBNF; /regex/ terminals become rules appended to `extra`."""
    tokens = [(m.lastgroup, m.group()) for m in _LARK_TOKEN.finditer(text)]
    if sum(len(t) for _, t in tokens) != len(text):
        raise ValueError(f"lark rule {rule}: cannot parse {text.strip()!r}")
    tokens = [t for t in tokens if t[0] != "ws"]
    out, brackets, i = [], 0, 0
    while i < len(tokens):
        kind, tok = tokens[i]
        if kind == "alias" or (tok == "~" and not out):
            raise ValueError(f"lark rule {rule}: {tok!r} is not supported here")
        if kind == "string" and tok.endswith("i"):
            raise ValueError(f"lark rule {rule}: case-insensitive literal {tok} is not supported")
        if kind == "string" and i + 2 < len(tokens) and tokens[i + 1][0] == "range":
            lo, hi = ast.literal_eval(tok), ast.literal_eval(tokens[i + 2][1])
            out.append(f"[{_class_char(lo)}-{_class_char(hi)}]")
            i += 3
            continue
        if kind == "string":
            out.append(_ebnf_string(ast.literal_eval(tok)))
        elif kind == "regex":
            pattern, flags = tok[1:].rsplit("/", 1)
            if flags:
                raise ValueError(f"lark rule {rule}: regex flags {flags!r} are not supported")
            sub = f"{rule}_re{len(extra)}"
            try:
                ebnf = str(xgr.Grammar.from_regex(pattern.replace("\\/", "/")))
            except RuntimeError as e:
                raise ValueError(f"lark rule {rule}: regex {tok}: {_clean_error(e)}") from None
            extra.append(_rename_root(ebnf, sub))
            out.append(sub)
        elif kind == "name":
            out.append(_lark_name(tok))
        elif tok == "~":
            n = tokens[i + 1][1] if i + 1 < len(tokens) else ""
            if i + 3 < len(tokens) and tokens[i + 2][0] == "range":
                out[-1] = f"{out[-1]}{{{n},{tokens[i + 3][1]}}}"
                i += 4
            else:
                out[-1] = f"{out[-1]}{{{n}}}"
                i += 2
            continue
        elif tok in "[]":
            brackets += 1 if tok == "[" else -1
            out.append("(" if tok == "[" else ")?")
        else:
            out.append(tok)
        i += 1
    if brackets:
        raise ValueError(f"lark rule {rule}: unbalanced [ ]")
    return " ".join(out) or '""'


def _class_char(c: str) -> str:
    if len(c) != 1:
        raise ValueError(f'lark range bounds must be single characters, got "{c}"')
    return "\\" + c if c in "\\]-^" else c


def _rename_root(ebnf: str, name: str) -> str:
    """Renames the rules `root`, `root_1`, ... of xgrammar's EBNF for a regex to `name`,
    `name_1`, ... outside string literals and character classes."""

    def sub(m: re.Match) -> str:
        return m.group(0) if m.group(0)[0] in '"[' else name + (m.group(1) or "")

    return re.sub(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\broot(_\d+)?\b', sub, ebnf).strip()
