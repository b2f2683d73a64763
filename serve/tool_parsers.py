"""Tool-call parsers: a model's output text -> content and OpenAI tool calls, per model family
(vLLM's `--tool-call-parser`). The registry `TOOL_PARSERS` is keyed by that name.

- `hermes` (Hermes 2/3, Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
  </tool_call>`, possibly several.
- `llama3_json` (Llama 3.1-3.3): `{"name": ..., "parameters": {...}}` at the start of the
  output or after `<|python_tag|>`, several separated by `;`.
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name": ..., "arguments": {...}}`.

Each parser is one function, `parse(text, final)`. With `final` it is the full extraction:
content is the text before the first call; the arguments are the call's JSON re-spaced as
`json.dumps` spaces it (serve/json_prefix.py); output that does not parse (malformed JSON, a
call without a name) is all content and no calls, as in vLLM. Without `final` it reads a
prefix of the output as it streams and returns what is already certain: content that no
later text can turn into a call, calls whose arguments have begun (serve/tool_calls.py turns
the differences between successive reads into OpenAI deltas). Either way `arguments` may
also be written `parameters`, and a call without either has arguments `{}`.
"""

from __future__ import annotations

import dataclasses
import random
import string
import uuid

from tandem.serve.json_prefix import JSONPrefixError, Node, scan, skip_ws

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclasses.dataclass
class ParsedCall:
    name: str | None  # None until the name's string has been read whole
    arguments: str  # JSON text (a prefix of it while streaming)
    complete: bool = True


@dataclasses.dataclass
class Parsed:
    content: str  # "" when there is none
    calls: list[ParsedCall] = dataclasses.field(default_factory=list)
    is_malformed: bool = False  # the calls could not be parsed: everything is content


class ToolParser:
    """One family's format. `markers`: the texts that begin its calls. `keeps_special_tokens`:
    the marker is a special token, which decoding must keep (vLLM turns
    `skip_special_tokens` off for Mistral's `[TOOL_CALLS]`; Llama's `<|python_tag|>` may go,
    a call is also recognised without it)."""

    name = ""
    markers: tuple[str, ...] = ()
    keeps_special_tokens = False

    def parse(self, text: str, final: bool) -> Parsed:
        raise NotImplementedError

    def make_id(self) -> str:
        return f"call_{uuid.uuid4().hex[:24]}"


class _Malformed(Exception):
    pass


def _split(text: str, marker: str, final: bool) -> tuple[str, str | None]:
    """(content, the text after the first `marker`, or None if there is none yet). While
    streaming, content ending in a beginning of `marker` holds that part back."""
    i = text.find(marker)
    if i >= 0:
        return text[:i], text[i + len(marker) :]
    if final:
        return text, None
    return text[: len(text) - _partial_suffix(text, marker)], None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def call_of(node: Node, final: bool) -> ParsedCall:
    """A call from its JSON object `{"name": ..., "arguments": ...}`."""
    if node.kind != "object":
        raise _Malformed
    name_node = node.field("name")
    if name_node is not None and name_node.kind != "string":
        raise _Malformed
    name = name_node.value if name_node is not None and name_node.complete else None
    args = node.field(*ARGUMENT_KEYS)
    if args is None:
        arguments = "{}" if node.complete and not node.has_key(*ARGUMENT_KEYS) else ""
    elif args.kind == "string":  # arguments already given as JSON text
        arguments = args.value
    else:
        arguments = args.text
    if (node.complete or final) and (name is None or not node.complete):
        raise _Malformed
    return ParsedCall(name, arguments, node.complete)


def _value(text: str, pos: int, final: bool) -> tuple[Node | None, int]:
    """The JSON value at `pos`; None when only whitespace is left (an error if `final`)."""
    pos = skip_ws(text, pos)
    if pos == len(text):
        if final:
            raise _Malformed
        return None, pos
    try:
        node, pos = scan(text, pos)
    except JSONPrefixError:
        raise _Malformed from None
    if final and not node.complete:
        raise _Malformed
    return node, pos


def _parse_or_content(parse_calls, text: str, final: bool) -> Parsed:
    try:
        return parse_calls()
    except _Malformed:
        return Parsed(text, is_malformed=True)


class HermesParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    markers = (start,)

    def parse(self, text: str, final: bool) -> Parsed:
        content, rest = _split(text, self.start, final)
        if rest is None:
            return Parsed(content)

        def calls() -> Parsed:
            parsed, pos = Parsed(content), 0
            while True:
                node, pos = _value(rest, pos, final)
                if node is None:
                    return parsed
                parsed.calls.append(call_of(node, final))
                if not node.complete:
                    return parsed
                pos = skip_ws(rest, pos)
                tail = rest[pos : pos + len(self.end)]
                if tail == self.end:
                    pos += len(self.end)
                elif not self.end.startswith(tail) or (final and tail):
                    raise _Malformed  # text after the JSON, inside the call
                # Text between calls and after the last one is dropped, as in vLLM.
                nxt = rest.find(self.start, pos)
                if nxt < 0:
                    return parsed
                pos = nxt + len(self.start)

        return _parse_or_content(calls, text, final)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    tag = "<|python_tag|>"
    markers = (tag,)

    def parse(self, text: str, final: bool) -> Parsed:
        if self.tag in text:
            content, rest = _split(text, self.tag, final)
        else:
            start = skip_ws(text, 0)
            if start == len(text):  # only whitespace: a call may still follow
                return Parsed(text if final else "")
            if text[start] != "{":
                return Parsed(_split(text, self.tag, final)[0])
            content, rest = "", text[start:]

        def calls() -> Parsed:
            parsed, pos = Parsed(content), 0
            while True:
                node, pos = _value(rest, pos, final)
                if node is None:
                    return parsed
                parsed.calls.append(call_of(node, final))
                if not node.complete:
                    return parsed
                pos = skip_ws(rest, pos)
                if pos == len(rest):
                    return parsed
                if rest[pos] != ";":
                    raise _Malformed
                pos = skip_ws(rest, pos + 1)
                if pos == len(rest):  # a trailing ";" ends the list
                    return parsed

        return _parse_or_content(calls, text, final)


class JsonListParser(ToolParser):
    """Calls as one JSON list (a lone object counts as a list of one), after `start` when
    there is one: Mistral's format, and `tool_choice: required`'s (serve/tool_calls.py)."""

    start = ""

    def parse(self, text: str, final: bool) -> Parsed:
        if self.start:
            content, rest = _split(text, self.start, final)
            if rest is None:
                return Parsed(content)
        else:
            content, rest = "", text

        def calls() -> Parsed:
            parsed = Parsed(content)
            node, _ = _value(rest, 0, final)
            if node is None:
                return parsed
            items = [node] if node.kind == "object" else node.items
            if node.kind not in ("object", "array") or (final and not items):
                raise _Malformed
            parsed.calls = [call_of(item, final) for item in items]
            # Text after the list is dropped, as in vLLM.
            return parsed

        return _parse_or_content(calls, text, final)


class MistralParser(JsonListParser):
    name = "mistral"
    start = "[TOOL_CALLS]"
    markers = (start,)
    keeps_special_tokens = True

    def make_id(self) -> str:
        # Mistral's chat templates accept only 9 alphanumerics (vLLM's MistralToolCall).
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(TOOL_PARSERS))}"
        )
    return TOOL_PARSERS[name]()


def detect_tool_parser(tokenizer) -> str | None:
    """The parser for a tokenizer's model, or None: the first marker its chat template
    writes (`[TOOL_CALLS]` -> mistral, `<tool_call>` -> hermes, `<|python_tag|>` ->
    llama3_json), else the first marker that is a token of its vocabulary, in that order.
    A Hermes fine-tune of Llama 3 has both `<tool_call>` in its template and
    `<|python_tag|>` in its vocabulary: the template decides."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: "default", "tool_use", ...
        template = "\n".join(t for t in template.values() if isinstance(t, str))
    order = [MistralParser, HermesParser, Llama3JsonParser]
    for parser in order:
        if any(m in template for m in parser.markers):
            return parser.name
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for parser in order:
        if any(m in vocab for m in parser.markers):
            return parser.name
    return None
