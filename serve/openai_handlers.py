"""The OpenAI endpoints' request handling: validate, tokenize, enqueue on the engine and
await its outputs, as one JSON body or as server-sent events. A client that disconnects,
streaming or not, aborts its request so its KV pages return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tandem.serve.chat_template import render_chat
from tandem.serve.formatting import ChatFormatter, CompletionFormatter, Formatter, TokenText
from tandem.serve.metrics import ServerMetrics
from tandem.serve.openai_errors import APIError, engine_error
from tandem.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
)
from tandem.serve.sampling_params import SamplingParams
from tandem.serve.tool_calls import plan_tools
from tandem.serve.tool_parsers import detect_tool_parser, get_tool_parser

logger = logging.getLogger(__name__)


class OpenAIHandlers:
    """The bodies of /v1/completions and /v1/chat/completions over one engine."""

    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        *,
        tool_call_parser: str | None = None,
        enable_auto_tool_choice: bool = True,
    ):
        """`tool_call_parser`: the tool-call format of the model's output (a name in
        serve/tool_parsers.py's registry); None: the one its chat template implies, if any.
        `enable_auto_tool_choice` false: tool_choice "auto" is refused."""
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)
        parser_name = tool_call_parser or detect_tool_parser(engine.tokenizer)
        self.tool_parser = get_tool_parser(parser_name) if parser_name else None
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.metrics = ServerMetrics(
            engine.stats,
            lambda: engine.is_running,
            model_name=model_name,
            max_model_len=engine.max_model_len,
        )

    # Request handling shared by both endpoints.

    async def handle(
        self,
        request: Request,
        req,
        formatter: Formatter,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        arrival: float,
        sampling_overrides: dict | None = None,
    ):
        """`sampling_overrides`: SamplingParams fields set over the request's (a tool
        choice's structured output)."""
        params = []
        for prompt in prompts:
            budget = max_tokens
            if budget is None:  # the rest of the context
                budget = self.engine.max_model_len - len(prompt)
                if budget < 1:
                    raise APIError(
                        400,
                        f"the prompt ({len(prompt)} tokens) fills the model's "
                        f"context length ({self.engine.max_model_len})",
                        param="messages",
                    )
            try:
                params.append(
                    SamplingParams(
                        **{**req.sampling_kwargs(self.tokenizer), **(sampling_overrides or {})},
                        max_tokens=budget,
                        logprobs=logprobs,
                    )
                )
            except ValueError as e:
                raise engine_error(e) from None
        client = req.user or getattr(request.state, "key_owner", None) or "default"
        request_id = f"{formatter.id_prefix}-{uuid.uuid4().hex}"
        streams = await self._add(request_id, prompts, params, client, req.priority)
        if req.stream:
            return _EventStream(
                self._events(formatter, request_id, streams, req.include_usage, arrival),
                media_type="text/event-stream",
            )
        finals = await _cancel_on_disconnect(request, self._collect(streams, arrival))
        if finals is None:
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(formatter.response(request_id, finals).model_dump())

    async def _add(self, request_id, prompts, params, client, priority) -> list[RequestStream]:
        streams = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                streams.append(
                    await self.engine.add_request(
                        f"{request_id}-{i}", prompt, p, client=client, priority=priority
                    )
                )
        except Exception as e:
            for s in streams:
                s.close()
            raise engine_error(e) from None
        return streams

    def _check_model(self, req) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(
                400,
                f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def _outputs(self, streams: list[RequestStream], arrival: float) -> AsyncIterator:
        """(prompt index, RequestOutput) from every stream as they come; closing this
        generator aborts the unfinished requests."""
        timers = [self.metrics.timer(arrival) for _ in streams]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream):
            try:
                async for out in stream:
                    timers[i].on_output(out)
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            num_open = len(streams)
            while num_open:
                i, item = await queue.get()
                if item is None:
                    num_open -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()

    async def _collect(self, streams: list[RequestStream], arrival: float) -> list:
        finals = [None] * len(streams)
        try:
            async for i, out in self._outputs(streams, arrival):
                finals[i] = out  # each output holds all text so far
        except EngineDeadError as e:
            raise engine_error(e) from None
        return finals

    async def _events(self, formatter: Formatter, request_id: str, streams, include_usage, arrival):
        outputs = self._outputs(streams, arrival)
        finals = [None] * len(streams)
        try:
            for chunk in formatter.first_chunks(request_id, len(streams)):
                yield _sse(chunk)
            async for i, out in outputs:
                finals[i] = out
                for chunk in formatter.chunks(request_id, i, out):
                    yield _sse(chunk)
            if include_usage:
                yield _sse(formatter.usage_chunk(request_id, finals))
        except Exception as e:  # noqa: BLE001 - the status line is sent: report it in the stream
            if isinstance(e, EngineDeadError):
                err = engine_error(e)
            else:
                logger.exception("request %s failed", request_id)
                err = APIError(500, f"internal error: {type(e).__name__}", type="internal_error")
            yield _sse(
                ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, code=err.code))
            )
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"

    # Endpoints.

    async def completions(self, req: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        self._check_model(req)
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else p for p in req.prompts()]
        texts = None
        if req.echo:
            texts = [
                p
                if isinstance(p, str)
                else self.tokenizer.decode(p, skip_special_tokens=req.skip_special_tokens)
                for p in req.prompts()
            ]
        formatter = CompletionFormatter(self.model_name, self.token_text, req, texts)
        # echo with max_tokens 0 scores the prompt: the engine samples one token (its
        # smallest budget), which the formatter drops.
        max_tokens = 1 if req.is_echo_only else req.max_tokens
        return await self.handle(
            request, req, formatter, prompts, max_tokens, req.logprobs, arrival
        )

    async def chat(self, req: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        self._check_model(req)
        try:
            tools = plan_tools(req, self.tool_parser, self.enable_auto_tool_choice, self.tokenizer)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        try:
            text = render_chat(
                self.tokenizer,
                req.messages,
                req.tools,
                add_generation_prompt=req.add_generation_prompt,
            )
        except Exception as e:  # noqa: BLE001 - no template, or the template refused
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        formatter = ChatFormatter(self.model_name, self.token_text, req, tools)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self.handle(
            request,
            req,
            formatter,
            [prompt],
            max_tokens,
            req.num_logprobs,
            arrival,
            tools.sampling_overrides(),
        )


class _EventStream(StreamingResponse):
    """Closes the body generator however the response ends (a disconnect included), so
    the request's `finally` aborts it promptly rather than at garbage collection."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _cancel_on_disconnect(request: Request, coro):
    """Runs `coro`; None if the client went away first, which cancels it (a non-streaming
    request would otherwise run to the end for nobody)."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # its generators' `finally` aborts the request
    return None
