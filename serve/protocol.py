"""The OpenAI request and response shapes the HTTP server speaks (pydantic v2).

Requests are strict: a wrong type, an unknown field or a feature the server lacks
(`suffix`, `best_of` != n) fails validation, which the server answers
with a 400 in OpenAI's error shape. Sampling bounds are left to `SamplingParams`, whose
ValueError names the field. vLLM's extra sampling fields are accepted too, `prompt_logprobs`
among them.

Scoring a prompt (lm-evaluation-harness's loglikelihood): `/v1/completions` with `echo`,
`logprobs` and `max_tokens: 0` returns the prompt's own tokens and logprobs, no completion.

serve/formatting.py turns the engine's outputs into these responses.
Tool calling's shapes are in serve/tool_protocol.py; serve/tool_calls.py says what
`tool_choice` does.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from tandem.serve.sampling_params import MAX_LOGPROBS
from tandem.serve.structured_protocol import StructuredRequest
from tandem.serve.tool_protocol import (
    AssistantToolCall,
    DeltaToolCall,
    NamedToolChoice,
    Tool,
    ToolCall,
    check_tools,
)

# OpenAI's caps: `logprobs` of the legacy completions API, `top_logprobs` of chat.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    pass


# Errors.


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


# Requests.


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingRequest(StructuredRequest):
    """Fields shared by completions and chat completions (and, from StructuredRequest,
    `response_format` and vLLM's structured-output fields)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    priority: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    min_tokens: int = 0
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _check_common(self):
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            # As vLLM: the response field is a whole-prompt list, which no chunk carries.
            raise ValueError("prompt_logprobs is not available when stream is true")
        return self

    def sampling_kwargs(self, tokenizer=None) -> dict[str, Any]:
        """The SamplingParams fields this request sets (None means the default); raises
        ValueError naming a malformed field. `tokenizer` turns `bad_words` into ids."""
        fields = {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "prompt_logprobs": self.num_prompt_logprobs,
            "logit_bias": {int(k): v for k, v in self.logit_bias.items()}
            if self.logit_bias
            else None,
            "min_tokens": self.min_tokens,
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": bad_word_ids(self.bad_words, tokenizer) if self.bad_words else None,
            "structured_output": self.structured_output(),
        }
        return {k: v for k, v in fields.items() if v is not None}

    @property
    def num_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: how many alternatives each prompt token needs."""
        return self.prompt_logprobs

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def bad_word_ids(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's bad_words: each word's ids, as written and after a space (a word mid-text is
    usually its own token with the space), without special tokens."""
    if tokenizer is None:
        raise ValueError("bad_words needs the model's tokenizer")
    ids = {}
    for word in words:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"bad_words must hold non-empty strings, got {word!r}")
        for text in (word.lstrip(), " " + word.lstrip()):
            tokens = tokenizer.encode(text, add_special_tokens=False)
            if tokens:
                ids[tuple(tokens)] = None
    return [list(t) for t in ids]


def _is_token_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(type(t) is int and t >= 0 for t in x)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # the legacy API's default
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, prompt):
        # One message instead of pydantic's error per branch of the union.
        is_batch = isinstance(prompt, list) and bool(prompt)
        if not (
            (isinstance(prompt, str) and prompt)
            or _is_token_ids(prompt)
            or (is_batch and all(isinstance(p, str) and p for p in prompt))
            or (is_batch and all(_is_token_ids(p) for p in prompt))
        ):
            raise ValueError(
                "prompt must be a non-empty string, a non-empty list of token ids (ints >= 0), "
                "or a non-empty list of either"
            )
        return prompt

    @model_validator(mode="after")
    def _check_unsupported(self):
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError(
                "max_tokens must be >= 1; 0 is only allowed with echo (to score the prompt)"
            )
        return self

    @property
    def is_echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt scored, nothing generated."""
        return self.echo and self.max_tokens == 0

    @property
    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs covers the prompt's tokens too (as vLLM, the larger count
        when prompt_logprobs is also given)."""
        counts = [self.prompt_logprobs, self.logprobs if self.echo else None]
        counts = [k for k in counts if k is not None]
        return max(counts) if counts else None

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant turns (content may be null)
    tool_call_id: str | None = None  # tool turns: the call this is the result of

    @model_validator(mode="after")
    def _check_tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed in assistant messages, not {self.role}")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, need tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    tools: list[Tool] | None = None
    # None: "auto" when there are tools (as OpenAI and vLLM), else "none".
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_unsupported(self):
        check_tools(self.tools, self.tool_choice)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs: how many alternatives each token needs."""
        return (self.top_logprobs or 0) if self.logprobs else None


# Responses.


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    """The legacy shape. With echo the prompt's tokens come first; its first token has no
    logprob (nothing precedes it), so its `token_logprobs` and `top_logprobs` are null."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's `Logprob`: one token of a prompt position's `prompt_logprobs` dict."""

    logprob: float
    rank: int | None  # 1 is the most likely; null when outside the alternatives computed
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, null for the first, else token id -> logprob
# for the prompt's own token and the top alternatives.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


def unix_now() -> int:
    return int(time.time())


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the reply is only tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        # As OpenAI: no `tool_calls` key when there are none.
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v}


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's place for it: the response


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        # A delta carries only what changed: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=unix_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_now)
    owned_by: str = "tandem"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# vLLM's tokenizer endpoints: POST /tokenize (a prompt, or chat messages rendered with the
# chat template), POST /detokenize, GET /version. Served at the root, not under /v1, as vLLM.


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)]
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None  # rendered by the template, as chat completions do
    add_generation_prompt: bool = True
    # The chat template adds the special tokens it wants; these are on top of them.
    add_special_tokens: bool = False
    return_token_strs: bool | None = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # with return_token_strs: each token's vocabulary entry


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str
