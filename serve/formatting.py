"""Engine outputs -> OpenAI responses and SSE chunks (the shapes are in protocol.py).

Choice `p * n + i` is completion `i` of prompt `p`. With `echo` a completion choice starts
with its prompt: the text, and with `logprobs` the prompt's tokens (from the engine's
prompt logprobs), in the response or in the choice's first chunk.
"""

from __future__ import annotations

from tandem.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogprob,
    Usage,
    unix_now,
)
from tandem.serve.tool_calls import ToolCallStream, ToolPlan
from tandem.serve.tool_protocol import DeltaToolCall, ToolCall

# Engine outputs -> responses.

# A floor for -inf: JSON has no infinities.
MIN_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


class TokenText:
    """A token id's text, cached (logprobs name every top alternative)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


def usage(finals: list, *, count_completions: bool = True) -> Usage:
    """Every prompt counted once, every completion's tokens (those cut by a stop string
    included: they were computed); none when `count_completions` is false (echo with
    max_tokens 0, whose one sampled token nobody asked for)."""
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    completion = completion if count_completions else 0
    cached = sum(out.num_cached_tokens for out in finals)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def prompt_logprobs(token_text: TokenText, out, k: int) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` of one RequestOutput: per prompt token, None for the first,
    else its own logprob and its top `k` alternatives by token id, with ranks."""
    steps: PromptLogprobs = []
    for e in _prompt_entries(out):
        if isinstance(e, int):
            steps.append(None)
            continue
        # Ranks from every alternative the engine computed (maybe more than k).
        ranks = {t: r for r, (t, _) in enumerate(e.top, 1)}
        step = {}
        for t, lp in [(e.token_id, e.logprob), *e.top[:k]]:
            step.setdefault(
                t,
                PromptLogprob(logprob=_finite(lp), rank=ranks.get(t), decoded_token=token_text(t)),
            )
        steps.append(step)
    return steps


def _prompt_entries(out) -> list:
    """The prompt's logprobs, an entry per token: a TokenLogprob, or the bare token id
    where there is no logprob (the first token)."""
    if out.prompt_logprobs is None:
        raise ValueError(f"request {out.request_id} has no prompt logprobs")
    pairs = zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
    return [token if e is None else e for token, e in pairs]


class Formatter:
    """Shapes one request's outputs; `chunks` keeps what each choice has streamed."""

    id_prefix = ""

    def __init__(self, model: str, token_text: TokenText, n: int, num_logprobs: int | None):
        self.model = model
        self.token_text = token_text
        self.n = n
        self.num_logprobs = num_logprobs
        self.created = unix_now()
        self._num_logprobs_sent: dict[int, int] = {}
        self._finish_sent: set[int] = set()

    def first_chunks(self, request_id: str, num_prompts: int) -> list:
        return []

    def chunks(self, request_id: str, prompt_index: int, out) -> list:
        """A chunk per choice with new text, new logprobs or its finish reason."""
        chunks = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            sent = self._num_logprobs_sent.get(index, 0)
            new_logprobs = c.logprobs[sent:] if c.logprobs is not None else []
            self._num_logprobs_sent[index] = sent + len(new_logprobs)
            text, logprobs = self._delta(prompt_index, index, out, c.new_text, new_logprobs)
            finish = c.finish_reason if index not in self._finish_sent else None
            if not (text or logprobs or finish):
                continue
            chunk = self._chunk(request_id, index, text, logprobs, finish)
            if chunk is None:  # all of the text held back (a tool call's beginning)
                continue
            if finish:
                self._finish_sent.add(index)
            chunks.append(chunk)
        return chunks

    def _delta(
        self, prompt_index: int, index: int, out, text: str, logprobs: list
    ) -> tuple[str, list]:
        """What choice `index` sends of its completion's new text and logprobs."""
        return text, logprobs

    def _chunk(self, request_id, index, text, logprobs, finish):
        """The chunk of choice `index`, or None when it has nothing to send."""
        raise NotImplementedError

    def usage_chunk(self, request_id: str, finals: list):
        raise NotImplementedError

    def response(self, request_id: str, finals: list):
        raise NotImplementedError

    def _choices(self, finals: list):
        for i, out in enumerate(finals):
            for c in out.outputs:
                yield i * self.n + c.index, c


class CompletionFormatter(Formatter):
    id_prefix = "cmpl"

    def __init__(
        self,
        model: str,
        token_text: TokenText,
        req: CompletionRequest,
        prompt_texts: list[str] | None = None,
    ):
        """`prompt_texts`: each prompt's text, which `echo` puts before its choices."""
        super().__init__(model, token_text, req.n, req.logprobs)
        if req.echo and prompt_texts is None:
            raise ValueError("echo needs the prompts' texts")
        self.prompt_texts = prompt_texts if req.echo else None
        self.is_echo_only = req.is_echo_only
        self.num_prompt_logprobs = req.prompt_logprobs
        self._offsets: dict[int, int] = {}  # choice -> characters of its tokens so far
        self._echoed: set[int] = set()

    def _delta(
        self, prompt_index: int, index: int, out, text: str, logprobs: list
    ) -> tuple[str, list]:
        """Echo: the prompt's text and logprobs before the choice's first delta; with
        max_tokens 0 the one token sampled is dropped."""
        if self.is_echo_only:
            text, logprobs = "", []
        if self.prompt_texts is None or index in self._echoed:
            return text, logprobs
        self._echoed.add(index)
        echo_logprobs = _prompt_entries(out) if self.num_logprobs is not None else []
        return self.prompt_texts[prompt_index] + text, echo_logprobs + logprobs

    def _logprobs(self, index: int, entries: list) -> CompletionLogprobs | None:
        """`entries`: TokenLogprobs, or bare token ids for tokens without a logprob."""
        if self.num_logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(index, 0)
        for e in entries:
            token = self.token_text(e if isinstance(e, int) else e.token_id)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            if isinstance(e, int):
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            # The chosen token too, as in vLLM. Tokens with one text (partial UTF-8
            # bytes) share a key, which keeps the most likely.
            top: dict[str, float] = {}
            for t, lp in [*e.top[: self.num_logprobs], (e.token_id, e.logprob)]:
                top[self.token_text(t)] = max(_finite(lp), top.get(self.token_text(t), -1e30))
            out.token_logprobs.append(_finite(e.logprob))
            out.top_logprobs.append(top)
        self._offsets[index] = offset
        return out

    def _chunk(self, request_id, index, text, logprobs, finish):
        choice = CompletionChoice(
            index=index, text=text, logprobs=self._logprobs(index, logprobs), finish_reason=finish
        )
        return CompletionResponse(
            id=request_id, created=self.created, model=self.model, choices=[choice]
        )

    def usage_chunk(self, request_id: str, finals: list) -> CompletionResponse:
        return CompletionResponse(
            id=request_id,
            created=self.created,
            model=self.model,
            choices=[],
            usage=usage(finals, count_completions=not self.is_echo_only),
        )

    def response(self, request_id: str, finals: list) -> CompletionResponse:
        choices = []
        for i, out in enumerate(finals):
            scored = None
            if self.num_prompt_logprobs is not None:
                scored = prompt_logprobs(self.token_text, out, self.num_prompt_logprobs)
            for c in out.outputs:
                index = i * self.n + c.index
                text, logprobs = self._delta(i, index, out, c.text, c.logprobs or [])
                choices.append(
                    CompletionChoice(
                        index=index,
                        text=text,
                        logprobs=self._logprobs(index, logprobs),
                        finish_reason=c.finish_reason,
                        prompt_logprobs=scored,
                    )
                )
        return CompletionResponse(
            id=request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(finals, count_completions=not self.is_echo_only),
        )


class ChatFormatter(Formatter):
    """With a tool plan whose parser is set, each choice's text goes through a
    ToolCallStream (streamed) or the plan's extraction (not): content and tool calls."""

    id_prefix = "chatcmpl"

    def __init__(
        self,
        model: str,
        token_text: TokenText,
        req: ChatCompletionRequest,
        tools: ToolPlan | None = None,
    ):
        super().__init__(model, token_text, req.n, req.num_logprobs)
        self.num_prompt_logprobs = req.prompt_logprobs
        self.tools = tools if tools is not None and tools.parser is not None else None
        self._tool_streams: dict[int, ToolCallStream] = {}

    def _logprobs(self, entries: list) -> ChatLogprobs | None:
        if self.num_logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            token = self.token_text(token_id)
            return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode())}

        content = [
            ChatTokenLogprob(
                **entry(e.token_id, e.logprob),
                top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in e.top[: self.num_logprobs]],
            )
            for e in entries
        ]
        return ChatLogprobs(content=content)

    def _wrap(self, request_id: str, choices: list, usage_: Usage | None = None):
        return ChatCompletionChunk(
            id=request_id, created=self.created, model=self.model, choices=choices, usage=usage_
        )

    def first_chunks(self, request_id: str, num_prompts: int) -> list:
        return [
            self._wrap(
                request_id,
                [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
            )
            for i in range(num_prompts * self.n)
        ]

    def _chunk(self, request_id, index, text, logprobs, finish):
        delta = DeltaMessage(content=text or None)
        if self.tools is not None:
            stream = self._tool_streams.setdefault(index, ToolCallStream(self.tools))
            content, calls = stream.feed(text, final=finish is not None)
            if not (content or calls or logprobs or finish):
                return None
            delta = DeltaMessage(
                content=content or None,
                tool_calls=[DeltaToolCall(**c) for c in calls] or None,
            )
            finish = self.tools.finish_reason(finish, stream.tools_called)
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=self._logprobs(logprobs), finish_reason=finish
        )
        return self._wrap(request_id, [choice])

    def _message(self, c) -> tuple[AssistantMessage, str | None]:
        """A finished choice's message and finish reason."""
        if self.tools is None:
            return AssistantMessage(content=c.text), c.finish_reason
        content, calls = self.tools.extract(c.text)
        message = AssistantMessage(content=content, tool_calls=[ToolCall(**t) for t in calls])
        return message, self.tools.finish_reason(c.finish_reason, bool(calls))

    def usage_chunk(self, request_id: str, finals: list) -> ChatCompletionChunk:
        return self._wrap(request_id, [], usage(finals))

    def response(self, request_id: str, finals: list) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=index,
                message=message,
                logprobs=self._logprobs(c.logprobs or []),
                finish_reason=finish,
            )
            for index, c in self._choices(finals)
            for message, finish in [self._message(c)]
        ]
        scored = None
        if self.num_prompt_logprobs is not None:
            [out] = finals  # chat has one prompt
            scored = prompt_logprobs(self.token_text, out, self.num_prompt_logprobs)
        return ChatCompletionResponse(
            id=request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(finals),
            prompt_logprobs=scored,
        )
