"""How a request asks for structured output, in every spelling clients send, and what
becomes of it: one `StructuredOutput` (serve/sampling_params.py) or a 400 naming the field.

- OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`
  (chat and, as vLLM, completions);
- vLLM's `structured_outputs`: `{"json" | "regex" | "choice" | "grammar" | "json_object"}`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (and
  `guided_decoding_backend`, accepted and ignored: there is one grammar engine here).

A request may ask in one of these ways only; two are a 400 rather than a guess. Whether the
grammar itself compiles is the engine's to say (`Engine.add_request`), also as a 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.serve.sampling_params import StructuredOutput


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs` request field: exactly one constraint."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StructuredRequest(_Request):
    """The structured-output fields of a completions or chat request (mixed into both)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None

    def structured_output(self) -> StructuredOutput | None:
        """The one constraint this request sets, or None. Raises ValueError naming the
        fields when it sets more than one, or when one is malformed."""
        asked = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked["response_format"] = StructuredOutput(json_object=True)
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema.schema is required")
            asked["response_format"] = StructuredOutput(json=_schema_text(fmt.json_schema.schema_))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            asked["structured_outputs"] = _build(
                "structured_outputs",
                json=None if so.json_ is None else _schema_text(so.json_),
                regex=so.regex,
                choice=so.choice,
                grammar=so.grammar,
                json_object=bool(so.json_object),
            )
        if self.guided_json is not None:
            asked["guided_json"] = _build("guided_json", json=_schema_text(self.guided_json))
        for name in ("regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                asked[f"guided_{name}"] = _build(f"guided_{name}", **{name: value})
        if len(asked) > 1:
            raise ValueError(f"structured output: set only one of {', '.join(sorted(asked))}")
        return next(iter(asked.values()), None)


def _build(field: str, **kwargs) -> StructuredOutput:
    try:
        return StructuredOutput(**kwargs)
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None


def _schema_text(schema: dict | bool | str) -> str:
    """A schema as JSON text; a string must already be JSON (vLLM accepts both)."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        return schema
    return json.dumps(schema, sort_keys=True)
