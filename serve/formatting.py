"""Engine outputs -> OpenAI responses and SSE chunks (the shapes are in protocol.py).

Choice `p * n + i` is completion `i` of prompt `p`.
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
    PromptTokensDetails,
    TopLogprob,
    Usage,
    unix_now,
)

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


def usage(finals: list) -> Usage:
    """Every prompt counted once, every completion's tokens (those cut by a stop string
    included: they were computed)."""
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    cached = sum(out.num_cached_tokens for out in finals)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


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
            finish = c.finish_reason if index not in self._finish_sent else None
            if not (c.new_text or new_logprobs or finish):
                continue
            self._num_logprobs_sent[index] = sent + len(new_logprobs)
            if finish:
                self._finish_sent.add(index)
            chunks.append(self._chunk(request_id, index, c.new_text, new_logprobs, finish))
        return chunks

    def _chunk(self, request_id, index, text, logprobs, finish):
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

    def __init__(self, model: str, token_text: TokenText, req: CompletionRequest):
        super().__init__(model, token_text, req.n, req.logprobs)
        self._offsets: dict[int, int] = {}  # choice -> characters of its tokens so far

    def _logprobs(self, index: int, entries: list) -> CompletionLogprobs | None:
        if self.num_logprobs is None:
            return None
        out = CompletionLogprobs()
        offset = self._offsets.get(index, 0)
        for e in entries:
            token = self.token_text(e.token_id)
            # The chosen token too, as in vLLM. Tokens with one text (partial UTF-8
            # bytes) share a key, which keeps the most likely.
            top: dict[str, float] = {}
            for t, lp in [*e.top, (e.token_id, e.logprob)]:
                top[self.token_text(t)] = max(_finite(lp), top.get(self.token_text(t), -1e30))
            out.tokens.append(token)
            out.token_logprobs.append(_finite(e.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(offset)
            offset += len(token)
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
            id=request_id, created=self.created, model=self.model, choices=[], usage=usage(finals)
        )

    def response(self, request_id: str, finals: list) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=index,
                text=c.text,
                logprobs=self._logprobs(index, c.logprobs or []),
                finish_reason=c.finish_reason,
            )
            for index, c in self._choices(finals)
        ]
        return CompletionResponse(
            id=request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(finals),
        )


class ChatFormatter(Formatter):
    id_prefix = "chatcmpl"

    def __init__(self, model: str, token_text: TokenText, req: ChatCompletionRequest):
        super().__init__(model, token_text, req.n, req.num_logprobs)

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
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=self._logprobs(logprobs), finish_reason=finish
        )
        return self._wrap(request_id, [choice])

    def usage_chunk(self, request_id: str, finals: list) -> ChatCompletionChunk:
        return self._wrap(request_id, [], usage(finals))

    def response(self, request_id: str, finals: list) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=index,
                message=AssistantMessage(content=c.text),
                logprobs=self._logprobs(c.logprobs or []),
                finish_reason=c.finish_reason,
            )
            for index, c in self._choices(finals)
        ]
        return ChatCompletionResponse(
            id=request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage(finals),
        )
