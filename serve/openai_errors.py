"""OpenAI's error body, `{"error": {message, type, param, code}}`, and what maps to it:
a bad request is a 400 (FastAPI's 422 included), a full queue 429, a dead engine 503.
"""

from __future__ import annotations

import dataclasses
import re

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tandem.serve.async_engine import EngineDeadError
from tandem.serve.engine import QueueFullError
from tandem.serve.protocol import ErrorInfo, ErrorResponse
from tandem.serve.sampling_params import SamplingParams

_PARAM_NAMES = {f.name for f in dataclasses.fields(SamplingParams)}


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


def engine_error(e: Exception) -> APIError:
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


def validation_error(e: RequestValidationError) -> APIError:
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
