"""OpenAI's tool-calling shapes (pydantic v2), for serve/protocol.py's chat request and
response: the request's `tools` and `tool_choice`, an assistant message's `tool_calls`, and
the calls of a response and of its stream's deltas.

A bad tool is a 400 that names it: a function name OpenAI would refuse, parameters that are
not a JSON schema, two tools of one name, a `tool_choice` naming no tool.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

# OpenAI's rule for function names, and dots (MCP's "server.tool" names).
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    pass


# Requests.


class ToolFunction(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments' object
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _FUNCTION_NAME.fullmatch(name):
            raise ValueError(
                f"the function name {name!r} must be 1 to 64 letters, digits, '_', '-' or '.'"
            )
        return name

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, parameters, info):
        if parameters is not None:
            problem = _schema_problem(parameters)
            if problem:
                name = info.data.get("name", "?")
                raise ValueError(f"the parameters of {name!r} are not a JSON schema: {problem}")
        return parameters


def _schema_problem(schema: dict) -> str | None:
    """Why `schema` is not a JSON schema, or None. jsonschema checks it against its
    metaschema where installed; else the fields a tool's schema most often gets wrong."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            return e.message
        return None
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if any(k not in _JSON_TYPES for k in kinds):
        return f"'type' {kind!r} is not a JSON type"
    if not isinstance(schema.get("properties", {}), dict):
        return "'properties' must be an object"
    required = schema.get("required", [])
    if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        return "'required' must be a list of strings"
    return None


class Tool(_Request):
    type: Literal["function"]
    function: ToolFunction


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class AssistantFunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as the model wrote it

    @field_validator("arguments")
    @classmethod
    def _check_arguments(cls, arguments: str) -> str:
        # Chat templates receive the arguments parsed (serve/chat_template.py).
        try:
            json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"the arguments are not JSON ({e})") from None
        return arguments


class AssistantToolCall(_Request):
    """A call of an earlier assistant turn, sent back in `messages`."""

    id: str
    type: Literal["function"] = "function"
    function: AssistantFunctionCall


def check_tools(tools: list[Tool] | None, tool_choice) -> None:
    """Raises ValueError for two tools of one name, or a `tool_choice` without tools or
    naming none of them."""
    names = [t.function.name for t in tools or []]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"tools must have distinct names; {', '.join(twice)} is given twice")
    if tool_choice is None or tool_choice == "none":
        return
    if tools is None:
        raise ValueError(f"tool_choice {_choice_text(tool_choice)} needs tools")
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
        raise ValueError(
            f"tool_choice names the function {tool_choice.function.name!r}, which is not "
            f"among the tools ({', '.join(names)})"
        )


def _choice_text(tool_choice) -> str:
    if isinstance(tool_choice, NamedToolChoice):
        return f"(the function {tool_choice.function.name!r})"
    return repr(tool_choice)


# Responses.


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    """A call's piece in a stream: the first has its index, id, type and name; the next
    ones only the index and more of the arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        out = {k: v for k, v in handler(self).items() if v is not None}
        if "function" in out:
            out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return out
