"""The OpenAI-compatible HTTP server: FastAPI over `AsyncEngine`.

`build_app(async_engine)` serves /v1/completions, /v1/chat/completions, /v1/models,
/health and /metrics, and vLLM's /tokenize, /detokenize and /version
(serve/openai_tokenize.py); the handlers (serve/openai_handlers.py) only validate, tokenize,
enqueue and await (the engine runs on its own thread or process). Every error has
OpenAI's body (serve/openai_errors.py); a missing or wrong API key is a 401. `serve(...)`
builds the engine and runs the app with uvicorn.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping, Sequence
from typing import Annotated

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.serve.async_engine import AsyncEngine
from tandem.serve.metrics import CONTENT_TYPE
from tandem.serve.openai_errors import APIError, engine_error, error_response, validation_error
from tandem.serve.openai_handlers import OpenAIHandlers
from tandem.serve.openai_tokenize import TokenizeHandlers, parse_tokenize_request, version
from tandem.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
)
from tandem.serve.tool_parsers import get_tool_parser

logger = logging.getLogger(__name__)


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


def build_app(
    async_engine: AsyncEngine,
    *,
    api_keys: Sequence[str] | Mapping[str, str] = (),
    model_name: str | None = None,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
) -> FastAPI:
    """The FastAPI app. `api_keys`: keys, or a dict key -> owner (the default VTC client
    of the key's requests); empty turns authentication off. `tool_call_parser`: how tool
    calls are read from the output (serve/tool_parsers.py; default: from the chat
    template); `enable_auto_tool_choice` false refuses tool_choice "auto"."""
    handlers = OpenAIHandlers(
        async_engine,
        model_name or async_engine.model_name,
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
    )
    app = FastAPI(title="tandem", docs_url=None, redoc_url=None, openapi_url=None)
    keys = dict(api_keys) if isinstance(api_keys, Mapping) else dict.fromkeys(api_keys, "default")
    if keys:
        app.add_middleware(_ApiKeyMiddleware, keys=keys)

    def fail(e: APIError) -> JSONResponse:
        handlers.metrics.errors.labels(str(e.status)).inc()
        return error_response(e)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return fail(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return fail(validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return fail(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        logger.exception("request failed", exc_info=e)
        return fail(APIError(500, f"internal error: {type(e).__name__}", type="internal_error"))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await handlers.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await handlers.chat(req, request)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=handlers.model_name, max_model_len=async_engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    tokenizing = TokenizeHandlers(
        handlers.tokenizer, handlers.model_name, async_engine.max_model_len
    )

    @app.post("/tokenize")
    async def tokenize(body: Annotated[dict, Body()]):
        return tokenizing.tokenize(parse_tokenize_request(body)).model_dump()

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        return tokenizing.detokenize(req).model_dump()

    @app.get("/version")
    async def server_version():
        return version().model_dump()

    @app.get("/health")
    async def health():
        if async_engine.dead_error is not None:
            return fail(engine_error(async_engine.dead_error))
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(handlers.metrics.render(), media_type=CONTENT_TYPE)

    return app


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
    tensor_parallel_flag: str = "tensor_parallel_size",
    engine_process: bool = True,
    warm_up: bool | None = None,
    compilation_cache_dir: str | None = None,
    tool_call_parser: str | None = None,
    enable_auto_tool_choice: bool = True,
    **engine_config,
) -> None:
    """Loads a checkpoint directory or a gin preset, builds the engine and serves it with
    uvicorn until interrupted. `engine_process`: the engine loop runs in its own process
    (the front end and the engine do not share a GIL), else on a thread of this one.
    `tensor_parallel_size`: split the heads over the first devices (errors about it name
    it `tensor_parallel_flag`); `mesh` (in-process only): where the weights and KV pages
    live. `tool_call_parser`, `enable_auto_tool_choice`: as build_app's. `engine_config`:
    EngineConfig fields."""
    import uvicorn

    from tandem.serve.engine_process import EngineSpec, ProcessEngine, build_engine

    if tool_call_parser is not None:
        get_tool_parser(tool_call_parser)  # an unknown name fails before the engine loads

    spec = EngineSpec(
        model_source,
        dtype=dtype,
        seed=seed,
        tensor_parallel_size=tensor_parallel_size,
        tensor_parallel_flag=tensor_parallel_flag,
        served_model_name=served_model_name,
        engine_config=engine_config,
        warm_up=warm_up,
        compilation_cache_dir=compilation_cache_dir,
    )
    if engine_process:
        if mesh is not None:
            raise ValueError(
                "serve: a mesh does not cross into the engine process; give "
                "tensor_parallel_size, or engine_process=False"
            )
        async_engine = ProcessEngine(spec)
    else:
        engine = build_engine(spec, mesh=mesh)
        async_engine = AsyncEngine(engine)
        tensor_parallel_size = 1 if engine.mesh is None else engine.mesh.shape["tensor"]
    app = build_app(
        async_engine,
        api_keys=api_keys,
        tool_call_parser=tool_call_parser,
        enable_auto_tool_choice=enable_auto_tool_choice,
    )
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
