"""Every error the server answers, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`code` tells clients what went wrong without parsing the message: invalid_json, invalid_value,
unsupported_parameter, context_length_exceeded, invalid_image, image_too_large, model_not_found,
not_found, method_not_allowed, unsupported_media_type, body_too_large, headers_too_large,
request_timeout, invalid_http, invalid_api_key, queue_full, shutting_down.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (ContextLengthError, ImageLoadError, ImageTooLargeError, InputError, JanusError, OverloadedError,
                      UnavailableError)


def _printable(text: str | None) -> str | None:
    # A message may quote the request (a lone surrogate, say), and UTF-8 cannot encode that:
    # the error itself must never fail to be sent.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, _printable(message), type_
        self.param, self.code, self.headers = _printable(param), code, headers

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.payload()).encode()

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)


def as_api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The answer to an exception from the engine or the library."""
    if isinstance(exc, OverloadedError):
        return APIError(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, UnavailableError):
        return APIError(503, str(exc), "service_unavailable", code="shutting_down")
    if isinstance(exc, ImageLoadError):
        code = "image_too_large" if isinstance(exc, ImageTooLargeError) else "invalid_image"
        return APIError(400, f"bad image: {exc}", param=param, code=code)
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, InputError):
        return APIError(400, str(exc), param=param, code="invalid_value")
    return APIError(500, f"{type(exc).__name__}: {exc}", "server_error")


def failure_response(exc: BaseException) -> JSONResponse:
    return as_api_error(exc).response()


# Starlette's own errors: a route that does not exist, a method a route does not take.
_HTTP_CODES = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """A validation error's location as OpenAI writes it ("messages[0].content"), without the
    body prefix and the union branches pydantic names ("str", "function-after[...]")."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", str(part)) and part not in _TYPE_NAMES and part != "body":
            out += f".{part}" if out else str(part)
    return out or None


def install_error_handlers(app: FastAPI, metrics: Any) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status in (400, 404):  # 401, 429 and 503 are counted where they are decided
            metrics.rejected.labels("invalid").inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("invalid").inc()
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return APIError(400, "the request has no body; send a JSON object", code="invalid_json").response()
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON ({first.get('msg', '')} at character "
                                 f"{first.get('loc', ('', '?'))[-1]})", code="invalid_json").response()
        param = _param(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if param is None and first.get("type") == "model_attributes_type":
            message = "the body must be a JSON object"
        return APIError(400, f"{param}: {message}" if param else message, param=param,
                        code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI raises this, from the parser's own error, for a body it cannot parse at all
            # (invalid UTF-8, nesting too deep for the JSON parser).
            return APIError(400, f"the body is not valid JSON ({type(exc.__cause__).__name__})",
                            code="invalid_json").response()
        kind, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", None))
        return APIError(exc.status_code, str(exc.detail), kind, code=code, headers=exc.headers).response()

    @app.exception_handler(JanusError)
    async def janus_error(request: Request, exc: JanusError) -> JSONResponse:
        return as_api_error(exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()
