"""What a chat request's `tools` and `tool_choice` do to its sampling and to its output, as in
vLLM:

- `none`: the tools are rendered into the prompt; the output is content, never parsed.
- `auto` (the default when tools are given): the output is parsed by the server's tool
  parser (serve/tool_parsers.py); calls become `tool_calls` with finish reason `tool_calls`.
- a named function: the output is constrained (structured output) to the function's
  `parameters` schema and is that call's arguments; the finish reason stays the engine's.
- `required`: the output is constrained to a JSON list of `{"name", "parameters"}` objects,
  one of the tools each (at most one without `parallel_tool_calls`), parsed into calls.

`ToolCallStream` turns a choice's text deltas into OpenAI's: content, then per call a first
delta with its index, id, type and name, then pieces of its arguments. It parses the whole
text again at each delta and sends what is new, so the streamed pieces always add up to the
non-streamed result for output that parses; for output that turns out malformed after a call
was sent, the stream stops sending (a sent call cannot be taken back) while the non-streamed
result is all content.
"""

from __future__ import annotations

import dataclasses
import json

from tandem.serve.sampling_params import StructuredOutput
from tandem.serve.tool_parsers import JsonListParser, Parsed, ParsedCall, ToolParser


class NamedFunctionParser(ToolParser):
    """tool_choice names a function: the whole output is its arguments."""

    def __init__(self, function: str, base: ToolParser | None):
        self.function = function
        self.base = base

    def parse(self, text: str, final: bool) -> Parsed:
        if not (text or final):
            return Parsed("")
        return Parsed("", [ParsedCall(self.function, text, final)])

    def make_id(self) -> str:
        return self.base.make_id() if self.base is not None else super().make_id()


class RequiredParser(JsonListParser):
    """tool_choice `required`: the output is a JSON list of calls."""

    def __init__(self, base: ToolParser | None):
        self.base = base

    def make_id(self) -> str:
        return self.base.make_id() if self.base is not None else super().make_id()


def named_function_schema(tool: dict) -> dict:
    """The arguments' schema; a function without parameters takes an empty object."""
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def required_schema(tools: list[dict], parallel_tool_calls: bool) -> dict:
    """vLLM's: a list (of one at most without parallel calls) of objects, each one tool's
    name and its parameters; the tools' `$defs` are hoisted to the top, where `$ref`s into
    them resolve."""
    defs: dict = {}
    options = []
    for tool in tools:
        params = dict(named_function_schema(tool))
        for name, schema in params.pop("$defs", {}).items():
            if defs.setdefault(name, schema) != schema:
                raise ValueError(
                    f"tools: the definition {name!r} has different schemas in different tools"
                )
        options.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [tool["function"]["name"]]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """How one chat request handles tools."""

    parser: ToolParser | None = None  # None: the output is content
    structured_output: StructuredOutput | None = None
    max_calls: int | None = None  # 1 without parallel_tool_calls
    keeps_finish_reason: bool = False  # a named function: "stop" stays "stop", as in vLLM
    keeps_special_tokens: bool = False  # decode with skip_special_tokens off (Mistral)
    strip_suffix: str = ""  # then the end-of-sequence token's text, dropped from the output

    def sampling_overrides(self) -> dict:
        """SamplingParams fields the plan sets over the request's."""
        out: dict = {}
        if self.structured_output is not None:
            out["structured_output"] = self.structured_output
        if self.keeps_special_tokens:
            out["skip_special_tokens"] = False
        return out

    def finish_reason(self, engine_reason: str | None, tools_called: bool) -> str | None:
        if tools_called and engine_reason == "stop" and not self.keeps_finish_reason:
            return "tool_calls"
        return engine_reason

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        """The full output -> (content, calls as OpenAI's `tool_calls`); content is None
        when there are calls and no text before them."""
        if self.parser is None:
            return text, []
        parsed = self.parser.parse(self._strip(text), final=True)
        calls = [
            {
                "id": self.parser.make_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in parsed.calls[: self.max_calls]
        ]
        return (parsed.content or None) if calls else parsed.content, calls

    def _strip(self, text: str) -> str:
        return text.removesuffix(self.strip_suffix) if self.strip_suffix else text


class ToolCallStream:
    """One choice's streamed output -> content deltas and tool-call deltas."""

    def __init__(self, plan: ToolPlan):
        if plan.parser is None:
            raise ValueError("ToolCallStream needs a plan with a parser")
        self.plan = plan
        self.text = ""
        self.sent_content = ""
        self.sent: list[tuple[str, str]] = []  # per call sent: (name, arguments so far)
        self.is_stopped = False

    @property
    def tools_called(self) -> bool:
        return bool(self.sent)

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """The text's next piece -> (new content, tool-call deltas); `final` with the last
        piece (the whole text is then parsed as the non-streamed response parses it)."""
        self.text += delta
        text = self.plan._strip(self.text) if final else self.text
        if self.is_stopped:
            return "", []
        parsed = self.plan.parser.parse(text, final)
        if parsed.is_malformed and self.sent:
            self.is_stopped = True
            return "", []
        content = ""
        if not self.sent and parsed.content.startswith(self.sent_content):
            content = parsed.content[len(self.sent_content) :]
            self.sent_content = parsed.content
        return content, self._call_deltas(parsed.calls[: self.plan.max_calls])

    def _call_deltas(self, calls: list[ParsedCall]) -> list[dict]:
        deltas = []
        for i, call in enumerate(calls):
            if call.name is None:
                break  # the name comes first in every delta; later calls wait for it
            if i == len(self.sent):
                deltas.append(
                    {
                        "index": i,
                        "id": self.plan.parser.make_id(),
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                )
                self.sent.append((call.name, call.arguments))
                continue
            name, arguments = self.sent[i]
            if name != call.name or not call.arguments.startswith(arguments):
                self.is_stopped = True  # not seen with output that parses; never resend
                break
            if len(call.arguments) > len(arguments):
                deltas.append(
                    {"index": i, "function": {"arguments": call.arguments[len(arguments) :]}}
                )
                self.sent[i] = (name, call.arguments)
        return deltas


def plan_tools(req, parser: ToolParser | None, is_auto_enabled: bool, tokenizer) -> ToolPlan:
    """The plan for a ChatCompletionRequest. `parser`: the server's, or None when neither
    the flag nor the chat template named one. Raises ValueError for `auto` without a
    parser."""
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = req.tool_choice
    if not tools or choice == "none":
        return ToolPlan()
    max_calls = None if req.parallel_tool_calls in (None, True) else 1
    if choice == "required":
        schema = required_schema(tools, req.parallel_tool_calls is not False)
        return ToolPlan(
            RequiredParser(parser), StructuredOutput(json=json.dumps(schema)), max_calls
        )
    if choice is not None and choice != "auto":  # a named function
        name = choice.function.name
        tool = next(t for t in tools if t["function"]["name"] == name)
        schema = named_function_schema(tool)
        return ToolPlan(
            NamedFunctionParser(name, parser),
            StructuredOutput(json=json.dumps(schema)),
            keeps_finish_reason=True,
        )
    if not is_auto_enabled:
        raise ValueError(
            'tool_choice "auto" requires --enable-auto-tool-choice and --tool-call-parser '
            "to be set (this server started with --no-enable-auto-tool-choice)"
        )
    if parser is None:
        raise ValueError(
            'tool_choice "auto" needs a tool call parser, and this model\'s chat template names '
            "none: start the server with --tool-call-parser (hermes, llama3_json, mistral), "
            'or send tool_choice "none", "required" or a named function'
        )
    if not parser.keeps_special_tokens:
        return ToolPlan(parser, max_calls=max_calls)
    return ToolPlan(
        parser,
        max_calls=max_calls,
        keeps_special_tokens=True,
        strip_suffix=tokenizer.eos_token or "",
    )
