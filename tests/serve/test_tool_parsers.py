"""Tool-call parsers on hand-written outputs of each family, and their streaming.

Invariants: the full extraction of well-formed output gives the content before the calls and
each call's name and arguments (JSON re-spaced as json.dumps spaces it); malformed output is
all content, as in vLLM; the stream, fed one character at a time or in any chunking,
reassembles exactly the full extraction.
"""

from __future__ import annotations

import json
import random

import pytest

from tandem.serve.json_prefix import JSONPrefixError, scan
from tandem.serve.tool_calls import (
    NamedFunctionParser,
    RequiredParser,
    ToolCallStream,
    ToolPlan,
    required_schema,
)
from tandem.serve.tool_parsers import (
    TOOL_PARSERS,
    detect_tool_parser,
    get_tool_parser,
)

WEATHER = '{"city": "Paris", "days": [1, 2.5e3, true, null], "note": "a\\"b\\u00e9\\ud83d\\ude00"}'


# (family, output, content, [(name, arguments)]); arguments are compared as text.
CASES = [
    # hermes (Hermes 2/3, Qwen2.5, Qwen3)
    ("hermes", "The answer is 4.", "The answer is 4.", []),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "hermes",
        "Let me look.\n<tool_call>\n"
        + '{"name": "get_weather", "arguments": '
        + WEATHER
        + "}\n</tool_call>\n<tool_call>\n"
        + '{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me look.\n",
        [("get_weather", WEATHER), ("get_time", "{}")],
    ),
    # The name after the arguments; an unclosed last call (vLLM's regex takes it too).
    (
        "hermes",
        '<tool_call>{"arguments": {"x": [1, {"y": "z"}]}, "name": "g"}',
        None,
        [("g", '{"x": [1, {"y": "z"}]}')],
    ),
    # Malformed: all content.
    (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        [],
    ),
    ("hermes", "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    ("hermes", "a <tool_call>", "a <tool_call>", []),
    ("hermes", "ends with <tool_ca", "ends with <tool_ca", []),
    # llama3_json (Llama 3.1-3.3)
    ("llama3_json", "Paris is sunny.", "Paris is sunny.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": '
        + WEATHER
        + "}",
        None,
        [("f", '{"a": 1}'), ("g", WEATHER)],
    ),
    (
        "llama3_json",
        'Checking. <|python_tag|>{"name": "f", "arguments": {}}',
        "Checking. ",
        [("f", "{}")],
    ),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),  # no name: not a call
    ("llama3_json", '{"name": "f", "parameters": {', '{"name": "f", "parameters": {', []),
    ("llama3_json", "   ", "   ", []),
    # mistral
    ("mistral", "Bonjour.", "Bonjour.", []),
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": '
        + WEATHER
        + "}]",
        None,
        [("f", '{"a": 1}'), ("g", WEATHER)],
    ),
    (
        "mistral",
        'Sure.[TOOL_CALLS][{"name": "f", "arguments": "{\\"b\\": 2}"}]',
        "Sure.",
        [("f", '{"b": 2}')],  # arguments given as a JSON string are that string
    ),
    ("mistral", '[TOOL_CALLS][{"name": "f"', '[TOOL_CALLS][{"name": "f"', []),
    ("mistral", "[TOOL_CALLS] oops", "[TOOL_CALLS] oops", []),
]


def plan(family: str, **kwargs) -> ToolPlan:
    return ToolPlan(get_tool_parser(family), **kwargs)


@pytest.mark.parametrize("family,text,content,calls", CASES)
def test_extract(family, text, content, calls):
    got_content, got_calls = plan(family).extract(text)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        json.loads(c["function"]["arguments"])  # always JSON
        assert c["type"] == "function"
        if family == "mistral":  # vLLM's MistralToolCall ids
            assert len(c["id"]) == 9 and c["id"].isalnum()
        else:
            assert c["id"].startswith("call_")
    assert len({c["id"] for c in got_calls}) == len(got_calls)


def test_arguments_keep_the_models_values():
    _, [call] = plan("hermes").extract(
        '<tool_call>{"name":"f","arguments":{"n":1.50,"s":"\\u00e9","deep":{"a":[]}}}</tool_call>'
    )
    args = call["function"]["arguments"]
    assert args == '{"n": 1.50, "s": "\\u00e9", "deep": {"a": []}}'
    assert json.loads(args) == {"n": 1.5, "s": "é", "deep": {"a": []}}


def stream(plan_: ToolPlan, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], list]:
    """Feeds `pieces` as the formatter does; returns (content, calls, deltas) reassembled as
    an OpenAI client does (by index: the first delta's name, the arguments appended)."""
    s = ToolCallStream(plan_)
    content, calls, all_deltas = "", {}, []
    for i, piece in enumerate(pieces):
        c, deltas = s.feed(piece, final=i == len(pieces) - 1)
        content += c
        for d in deltas:
            all_deltas.append(d)
            if d["index"] not in calls:
                assert set(d) == {"index", "id", "type", "function"}, d
                assert set(d["function"]) == {"name", "arguments"}
                calls[d["index"]] = [d["function"]["name"], d["function"]["arguments"]]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]][1] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return (content or None) if calls else content, [tuple(v) for v in calls.values()], all_deltas


def chunkings(text: str, seed: int, num: int = 30):
    yield list(text)  # character by character
    yield [text]
    rng = random.Random(seed)
    for _ in range(num):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(8, len(text) - 1))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


# Malformed output that goes wrong after a call's name: the stream has sent the call, which
# cannot be taken back (tool_calls.py), where the full result is all content.
SENT_THEN_MALFORMED = {
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
    '{"name": "f", "parameters": {',
    '[TOOL_CALLS][{"name": "f"',
}
STREAMABLE = [c for c in CASES if c[1] not in SENT_THEN_MALFORMED]


@pytest.mark.parametrize("family,text,content,calls", STREAMABLE)
def test_stream_reassembles_the_full_extraction(family, text, content, calls):
    for i, pieces in enumerate(chunkings(text, seed=len(text))):
        got_content, got_calls, _ = stream(plan(family), pieces)
        assert (got_content, got_calls) == (content, calls), (i, pieces)


def test_stream_sends_name_first_then_arguments_pieces():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    _, _, deltas = stream(plan("hermes"), list(text))
    first, *rest = deltas
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert first["id"].startswith("call_") and first["index"] == 0
    assert "".join(d["function"]["arguments"] for d in rest) == '{"city": "Paris"}'
    assert len(rest) > 5  # the arguments stream as they come, not at the end


def test_stream_holds_back_only_what_may_be_a_marker():
    s = ToolCallStream(plan("hermes"))
    assert s.feed("Hi <tool") == ("Hi ", [])
    assert s.feed("box>") == ("<toolbox>", [])  # not a marker after all
    s = ToolCallStream(plan("llama3_json"))
    assert s.feed("  ") == ("", [])  # a call may still begin
    assert s.feed("ok") == ("  ok", [])


def test_malformed_after_a_streamed_call_stops_the_stream():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call> trailing'
    content, calls, _ = stream(plan("hermes"), list(text))
    assert content is None and calls == [("f", '{"a": 1}')]
    assert plan("hermes").extract(text) == (text, [])  # the full result: content


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {}}'
    one = plan("llama3_json", max_calls=1)
    assert [c["function"]["name"] for c in one.extract(text)[1]] == ["f"]
    assert stream(one, list(text))[1] == [("f", "{}")]


def test_finish_reason():
    p = plan("hermes")
    assert p.finish_reason("stop", tools_called=True) == "tool_calls"
    assert p.finish_reason("length", tools_called=True) == "length"
    assert p.finish_reason("stop", tools_called=False) == "stop"
    named = ToolPlan(NamedFunctionParser("f", None), keeps_finish_reason=True)
    assert named.finish_reason("stop", tools_called=True) == "stop"  # as vLLM (and OpenAI)


def test_mistral_drops_the_end_of_sequence_text():
    p = plan("mistral", keeps_special_tokens=True, strip_suffix="</s>")
    text = '[TOOL_CALLS][{"name": "f", "arguments": {}}]</s>'
    assert p.extract(text)[1][0]["function"]["arguments"] == "{}"
    assert p.extract("Hello.</s>") == ("Hello.", [])
    assert stream(p, ["Hello.", "</s>"])[0] == "Hello."


# Forced tool choices: the output is what the grammar allowed.


def test_named_function_output_is_the_arguments():
    p = ToolPlan(NamedFunctionParser("get_weather", None), keeps_finish_reason=True)
    text = '{"city": "Paris"}'
    content, [call] = p.extract(text)
    assert content is None and call["function"] == {"name": "get_weather", "arguments": text}
    for pieces in chunkings(text, seed=1, num=5):
        assert stream(p, pieces)[:2] == (None, [("get_weather", text)])


def test_required_output_is_a_list_of_calls():
    p = ToolPlan(RequiredParser(None))
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    content, calls = p.extract(text)
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"a": 1}'),
        ("g", "{}"),
    ]
    for pieces in chunkings(text, seed=2, num=5):
        assert stream(p, pieces)[:2] == (None, [("f", '{"a": 1}'), ("g", "{}")])
    assert p.extract("no list") == ("no list", [])  # unconstrained output: content


def test_required_schema_is_vllms():
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
            "$defs": {"P": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "g"}},
    ]  # fmt: skip
    schema = required_schema(tools, parallel_tool_calls=True)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    f, g = schema["items"]["anyOf"]
    assert f["properties"]["name"] == {"type": "string", "enum": ["f"]}
    assert f["required"] == ["name", "parameters"]
    assert "$defs" not in f["properties"]["parameters"]
    assert schema["$defs"] == {"P": {"type": "string"}}
    assert g["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert tools[0]["function"]["parameters"]["$defs"]  # the request's tools are untouched
    assert required_schema(tools, parallel_tool_calls=False)["maxItems"] == 1


# The JSON prefix scanner and parser selection.


def test_scan_text_of_a_prefix_is_a_prefix():
    text = '{"a" : [1 , -2.5e+3, "x\\ny", {"b": null}] ,"c":true, "d": "\\ud83d\\ude00"}'
    whole, end = scan(text, 0)
    assert whole.complete and end == len(text)
    assert json.loads(whole.text) == json.loads(text)
    for i in range(1, len(text)):
        part, _ = scan(text[:i], 0)
        assert whole.text.startswith(part.text), (i, part.text)
        assert not part.complete


@pytest.mark.parametrize("bad", ['{"a" 1}', "[1,,2]", '{"a": tru}', '"\\x"', "{'a': 1}", "01"])
def test_scan_rejects_what_no_continuation_fixes(bad):
    with pytest.raises(JSONPrefixError):
        scan(bad + " ", 0)


class _Tok:
    def __init__(self, template, vocab=()):
        self.chat_template = template
        self._vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return self._vocab


def test_detect_tool_parser():
    assert detect_tool_parser(_Tok("{{ '<tool_call>' }}")) == "hermes"
    assert detect_tool_parser(_Tok("[TOOL_CALLS] {{ tools }}")) == "mistral"
    assert detect_tool_parser(_Tok("<|python_tag|>")) == "llama3_json"
    # A Hermes fine-tune of Llama: the template decides over the vocabulary.
    assert detect_tool_parser(_Tok("<tool_call>", ["<|python_tag|>"])) == "hermes"
    assert detect_tool_parser(_Tok("plain", ["<|python_tag|>"])) == "llama3_json"
    assert detect_tool_parser(_Tok({"default": "x", "tool_use": "<tool_call>"})) == "hermes"
    assert detect_tool_parser(_Tok(None)) is None
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral"]
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral"):
        get_tool_parser("pythonic")
