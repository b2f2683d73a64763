"""JSON read from a prefix of a model's output, for tool-call parsing while it streams.

`scan(s, pos)` reads one JSON value starting at `s[pos]` and returns a `Node` even when `s`
ends inside it (`complete` false). Its `text` is the value re-spaced as `json.dumps` spaces
it (", " between items, ": " after keys; strings and numbers kept as written), and the text
of a prefix is always a prefix of the text of any longer input: what a stream has sent
never needs taking back. Input that no continuation can make valid JSON raises
`JSONPrefixError`.

Plain Python on purpose: the streaming parsers call it again on the whole text at each
delta (tool calls are short), so both the streamed and the full result come from one
function.
"""

from __future__ import annotations

import dataclasses
import json
import re

_WHITESPACE = " \t\n\r"
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_LITERALS = ("true", "false", "null")
_ESCAPES = frozenset('"\\/bfnrt')
_HEX = frozenset("0123456789abcdefABCDEF")


class JSONPrefixError(ValueError):
    """No continuation of the text is valid JSON."""


@dataclasses.dataclass
class Node:
    kind: str  # "object", "array", "string" or "atom" (a number, true, false, null)
    text: str  # the canonical text read so far: a prefix of the whole value's
    complete: bool
    value: str | None = None  # strings: the decoded characters read so far (a prefix)
    fields: list[tuple[str | None, Node | None]] = dataclasses.field(default_factory=list)
    """Objects: (key, value) in order; key None while the key is unfinished, value None
    until the value has begun."""
    items: list[Node] = dataclasses.field(default_factory=list)  # arrays

    def field(self, *keys: str) -> Node | None:
        """The value of the first field named one of `keys`, if it has begun."""
        return next((v for k, v in self.fields if k in keys and v is not None), None)

    def has_key(self, *keys: str) -> bool:
        return any(k in keys for k, _ in self.fields)


def skip_ws(s: str, pos: int) -> int:
    while pos < len(s) and s[pos] in _WHITESPACE:
        pos += 1
    return pos


def scan(s: str, pos: int) -> tuple[Node, int]:
    """The value at `s[pos]` (leading whitespace skipped) and the position after it."""
    pos = skip_ws(s, pos)
    if pos == len(s):
        raise JSONPrefixError("no value")
    c = s[pos]
    if c == "{":
        return _object(s, pos)
    if c == "[":
        return _array(s, pos)
    if c == '"':
        return _string(s, pos)
    if c == "-" or c.isdigit():
        return _number(s, pos)
    if c.isalpha():
        return _literal(s, pos)
    raise JSONPrefixError(f"unexpected {c!r} at {pos}")


def _object(s: str, pos: int) -> tuple[Node, int]:
    node = Node("object", "{", False)
    pos = skip_ws(s, pos + 1)
    if pos == len(s):
        return node, pos
    if s[pos] == "}":
        node.text, node.complete = "{}", True
        return node, pos + 1
    while True:
        if s[pos] != '"':
            raise JSONPrefixError(f"expected a key at {pos}")
        key, pos = _string(s, pos)
        node.text += key.text
        if not key.complete:
            node.fields.append((None, None))
            return node, pos
        node.fields.append((key.value, None))
        pos = skip_ws(s, pos)
        if pos == len(s):
            return node, pos
        if s[pos] != ":":
            raise JSONPrefixError(f"expected ':' at {pos}")
        node.text += ": "
        pos = skip_ws(s, pos + 1)
        if pos == len(s):
            return node, pos
        value, pos = scan(s, pos)
        node.fields[-1] = (key.value, value)
        node.text += value.text
        if not value.complete:
            return node, pos
        pos = skip_ws(s, pos)
        if pos == len(s):
            return node, pos
        if s[pos] == "}":
            node.text += "}"
            node.complete = True
            return node, pos + 1
        if s[pos] != ",":
            raise JSONPrefixError(f"expected ',' or '}}' at {pos}")
        node.text += ", "
        pos = skip_ws(s, pos + 1)
        if pos == len(s):
            return node, pos


def _array(s: str, pos: int) -> tuple[Node, int]:
    node = Node("array", "[", False)
    pos = skip_ws(s, pos + 1)
    if pos == len(s):
        return node, pos
    if s[pos] == "]":
        node.text, node.complete = "[]", True
        return node, pos + 1
    while True:
        item, pos = scan(s, pos)
        node.items.append(item)
        node.text += item.text
        if not item.complete:
            return node, pos
        pos = skip_ws(s, pos)
        if pos == len(s):
            return node, pos
        if s[pos] == "]":
            node.text += "]"
            node.complete = True
            return node, pos + 1
        if s[pos] != ",":
            raise JSONPrefixError(f"expected ',' or ']' at {pos}")
        node.text += ", "
        pos = skip_ws(s, pos + 1)
        if pos == len(s):
            return node, pos


def _string(s: str, pos: int) -> tuple[Node, int]:
    """A string; an escape the input cuts short is left out until it is whole, and so is a
    final high surrogate (`\\ud83d`), which the next escape may pair into one character."""
    i = pos + 1
    safe = i  # the end of the last whole character or escape
    decoded_end = i  # the same, less a trailing high surrogate escape
    while i < len(s):
        c = s[i]
        if c == '"':
            raw = s[pos + 1 : i]
            return Node("string", f'"{raw}"', True, value=_decode(raw)), i + 1
        if c == "\\":
            if i + 1 == len(s):
                break
            e = s[i + 1]
            if e == "u":
                digits = s[i + 2 : i + 6]
                if not all(d in _HEX for d in digits):
                    raise JSONPrefixError(f"bad \\u escape at {i}")
                if len(digits) < 4:
                    break
                i += 6
                safe = i
                if not 0xD800 <= int(digits, 16) <= 0xDBFF:
                    decoded_end = i
                continue
            if e not in _ESCAPES:
                raise JSONPrefixError(f"bad escape at {i}")
            i += 2
        elif ord(c) < 0x20:
            raise JSONPrefixError(f"control character in a string at {i}")
        else:
            i += 1
        safe = decoded_end = i
    raw = s[pos + 1 : safe]
    return Node("string", f'"{raw}', False, value=_decode(s[pos + 1 : decoded_end])), len(s)


def _decode(raw: str) -> str:
    return json.loads(f'"{raw}"')


def _number(s: str, pos: int) -> tuple[Node, int]:
    end = pos
    while end < len(s) and s[end] in _NUMBER_CHARS:
        end += 1
    text = s[pos:end]
    if end == len(s):  # more digits may follow
        if not (_NUMBER.fullmatch(text) or _NUMBER.fullmatch(text + "0")):
            raise JSONPrefixError(f"bad number {text!r}")
        return Node("atom", text, False), end
    if not _NUMBER.fullmatch(text):
        raise JSONPrefixError(f"bad number {text!r}")
    return Node("atom", text, True), end


def _literal(s: str, pos: int) -> tuple[Node, int]:
    end = pos
    while end < len(s) and s[end].isalpha():
        end += 1
    word = s[pos:end]
    if word in _LITERALS and end < len(s):
        return Node("atom", word, True), end
    if end == len(s) and any(lit.startswith(word) for lit in _LITERALS):
        return Node("atom", word, False), end
    raise JSONPrefixError(f"unexpected {word!r} at {pos}")
