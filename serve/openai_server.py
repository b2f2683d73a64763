"""The OpenAI-compatible HTTP server: FastAPI over `AsyncEngine`.

`build_app(async_engine)` serves /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics. Handlers only validate, tokenize, enqueue and await (the engine
runs on its own thread). Every error has OpenAI's body `{"error": {message, type, param,
code}}`: a bad request is a 400 (FastAPI's 422 included), a full queue 429, a dead engine
503, a missing or wrong API key 401. A client that disconnects, streaming or not, aborts
its request so its KV pages return.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.serve.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tandem.serve.engine import QueueFullError
from tandem.serve.formatting import ChatFormatter, CompletionFormatter, Formatter, TokenText
from tandem.serve.metrics import CONTENT_TYPE, ServerMetrics
from tandem.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from tandem.serve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code


def error_response(e: APIError) -> JSONResponse:
    body = ErrorResponse(
        error=ErrorInfo(message=e.message, type=e.type, param=e.param, code=e.code)
    )
    return JSONResponse(body.model_dump(), status_code=e.status)


def _engine_error(e: Exception) -> APIError:
    """The engine's refusals as HTTP errors."""
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type="service_unavailable", code="engine_dead")
    if isinstance(e, QueueFullError):
        return APIError(
            429,
            f"the server is busy ({e}); retry later",
            type="rate_limit_error",
            code="queue_full",
        )
    if isinstance(e, ValueError):
        # SamplingParams and the engine start their messages with the field's name.
        match = re.match(r"(\w+) must", str(e))
        param = match.group(1) if match else None
        return APIError(400, str(e), param=param if param in _PARAM_NAMES else None)
    raise e


_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


class _ApiKeyMiddleware:
    """Bearer keys for /v1/*; the key's owner becomes the default VTC client."""

    def __init__(self, app, keys: Mapping[str, str]):
        self.app = app
        self.keys = {k.encode(): owner for k, owner in keys.items()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"")
            given = auth[7:] if auth[:7].lower() == b"bearer " else b""
            # compare_digest: no timing hints about how much of a key matched.
            owner = next((o for k, o in self.keys.items() if hmac.compare_digest(k, given)), None)
            if owner is None:
                error = APIError(
                    401,
                    "missing or invalid API key (Authorization: Bearer ...)",
                    code="invalid_api_key",
                )
                await error_response(error)(scope, receive, send)
                return
            scope.setdefault("state", {})["key_owner"] = owner
        await self.app(scope, receive, send)


class _Server:
    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)
        self.metrics = ServerMetrics(engine.stats, lambda: engine.is_running)

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
    ):
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
                    SamplingParams(**req.sampling_kwargs(), max_tokens=budget, logprobs=logprobs)
                )
            except ValueError as e:
                raise _engine_error(e) from None
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
            raise _engine_error(e) from None
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
            raise _engine_error(e) from None
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
                err = _engine_error(e)
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
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=req.add_generation_prompt, tokenize=False
            )
        except Exception as e:  # noqa: BLE001 - no template, or the template refused
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from None
        prompt = self.tokenizer.encode(text, add_special_tokens=False)
        formatter = ChatFormatter(self.model_name, self.token_text, req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await self.handle(
            request, req, formatter, [prompt], max_tokens, req.num_logprobs, arrival
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


def build_app(
    async_engine: AsyncEngine,
    *,
    api_keys: Sequence[str] | Mapping[str, str] = (),
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app. `api_keys`: keys, or a dict key -> owner (the default VTC client
    of the key's requests); empty turns authentication off."""
    server = _Server(async_engine, model_name or async_engine.model_name)
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None, openapi_url=None)
    keys = dict(api_keys) if isinstance(api_keys, Mapping) else dict.fromkeys(api_keys, "default")
    if keys:
        app.add_middleware(_ApiKeyMiddleware, keys=keys)

    def fail(e: APIError) -> JSONResponse:
        server.metrics.errors.labels(str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return fail(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return fail(_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return fail(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        logger.exception("request failed", exc_info=e)
        return fail(APIError(500, f"internal error: {type(e).__name__}", type="internal_error"))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await server.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await server.chat(req, request)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=server.model_name, max_model_len=async_engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health():
        if async_engine.dead_error is not None:
            return fail(_engine_error(async_engine.dead_error))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the first problem, with the field that has it."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {first.get('ctx', {}).get('error', '')}".strip())
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if loc:
        return APIError(400, f"{loc}: {message}", param=loc)
    # A whole-request check ("echo is not supported") names its field first.
    match = re.match(r"(\w+) ", message)
    return APIError(400, message, param=match.group(1) if match else None)


# Running it.


def serve(
    model_source: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] | Mapping[str, str] = (),
    served_model_name: str | None = None,
    dtype: str = "auto",
    seed: int = 0,
    log_level: str = "info",
    mesh=None,
    tensor_parallel_size: int = 1,
    engine_process: bool = True,
    warm_up: bool | None = None,
    compilation_cache_dir: str | None = None,
    **engine_config,
) -> None:
    """Loads a checkpoint directory or a gin preset, builds the engine and serves it with
    uvicorn until interrupted. `engine_process`: the engine loop runs in its own process
    (the front end and the engine do not share a GIL), else on a thread of this one.
    `tensor_parallel_size`: split the heads over the first devices; `mesh` (in-process
    only): where the weights and KV pages live. `engine_config`: EngineConfig fields."""
    import uvicorn

    if engine_process:
        if mesh is not None:
            raise ValueError(
                "serve: a mesh does not cross into the engine process; give "
                "tensor_parallel_size, or engine_process=False"
            )
        from tandem.serve.engine_process import EngineSpec, ProcessEngine

        spec = EngineSpec(
            model_source,
            dtype=dtype,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            tensor_parallel_flag=TENSOR_PARALLEL_FLAG,
            served_model_name=served_model_name,
            engine_config=engine_config,
            warm_up=warm_up,
            compilation_cache_dir=compilation_cache_dir,
        )
        async_engine = ProcessEngine(spec)
    else:
        from tandem.serve.engine import Engine, EngineConfig
        from tandem.serve.llm import load_for_serving, serving_config, tensor_parallel_mesh
        from tandem.serve.startup import enable_compilation_cache, warm_up_engine

        enable_compilation_cache(compilation_cache_dir)
        if mesh is None:
            mesh = tensor_parallel_mesh(
                serving_config(model_source), tensor_parallel_size, flag=TENSOR_PARALLEL_FLAG
            )
        model, tokenizer, name = load_for_serving(model_source, dtype=dtype, seed=seed, mesh=mesh)
        engine = Engine(
            model,
            tokenizer,
            EngineConfig(**engine_config),
            model_name=served_model_name or name,
            mesh=mesh,
        )
        warm_up_engine(engine, warm_up)
        async_engine = AsyncEngine(engine)
        tensor_parallel_size = 1 if mesh is None else mesh.shape["tensor"]
    app = build_app(async_engine, api_keys=api_keys)
    where = (
        f" (tensor parallel over {tensor_parallel_size} devices)"
        if tensor_parallel_size > 1
        else ""
    )
    loop = "its own process" if engine_process else "a thread"
    print(
        f"tandem: serving {async_engine.model_name!r} at http://{host}:{port}/v1{where}; "
        f"the engine runs in {loop}",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        async_engine.shutdown()


TENSOR_PARALLEL_FLAG = "--tensor_parallel_size"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `tandem serve` flags."""
    parser.add_argument(
        "model",
        nargs="?",
        help="a Hugging Face checkpoint directory or a gin preset (e.g. models/tiny.gin)",
    )
    parser.add_argument("--model", dest="model_flag", help="the same, as a flag")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api_key",
        action="append",
        default=[],
        metavar="KEY[=OWNER]",
        help="accept this Bearer key (repeatable); OWNER is its VTC client. Also read, "
        "comma-separated, from $TANDEM_API_KEYS (keeps keys out of `ps`)",
    )
    parser.add_argument("--served_model_name", default=None)
    add_dtype_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_model_len", type=int, default=None)
    parser.add_argument("--max_num_seqs", type=int, default=64)
    parser.add_argument("--max_num_batched_tokens", type=int, default=512)
    parser.add_argument("--page_size", type=int, default=16)
    parser.add_argument("--num_pages", type=int, default=None)
    parser.add_argument("--policy", choices=["fcfs", "priority", "vtc"], default="fcfs")
    add_tensor_parallel_argument(parser)
    parser.add_argument(
        "--engine_process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine loop in its own process, off the HTTP front end's GIL "
        "(--no-engine_process: on a thread of the server's process)",
    )
    parser.add_argument(
        "--warm_up",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile every step shape before serving (default: on a GPU or TPU only)",
    )
    parser.add_argument(
        "--compilation_cache_dir",
        default=None,
        help="JAX's persistent compilation cache: a second start compiles nothing "
        "(default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/tandem/jax on a GPU or TPU)",
    )
    parser.add_argument("--num_decode_steps", type=int, default=8)
    parser.add_argument("--log_level", default="info")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype auto` (the checkpoint's; bfloat16 for a preset on a GPU or TPU)."""
    from tandem.serve.startup import DTYPES

    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="the weights' dtype; auto: the checkpoint's own, or bfloat16 for a preset "
        "on a GPU or TPU (float32 on a CPU)",
    )


def add_tensor_parallel_argument(parser: argparse.ArgumentParser) -> None:
    """`--tensor_parallel_size N`, with vLLM's `--tensor-parallel-size` as an alias."""
    parser.add_argument(
        TENSOR_PARALLEL_FLAG,
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="split the attention heads and FFN over the first N devices (tensor parallel)",
    )


def run_server(args: argparse.Namespace) -> int:
    """`tandem serve`: wire with add_serve_arguments(sub) and set_defaults(func=run_server)."""
    args.model = args.model_flag or args.model
    if not args.model:
        raise ValueError("tandem serve: give a model (a checkpoint directory or a gin preset)")
    specs = args.api_key + [k for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k]
    keys = dict(k.split("=", 1) if "=" in k else (k, "default") for k in specs)
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_keys=keys,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        seed=args.seed,
        log_level=args.log_level,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        page_size=args.page_size,
        num_pages=args.num_pages,
        policy=args.policy,
        tensor_parallel_size=args.tensor_parallel_size,
        engine_process=args.engine_process,
        warm_up=args.warm_up,
        compilation_cache_dir=args.compilation_cache_dir,
        num_decode_steps=args.num_decode_steps,
    )
    return 0
