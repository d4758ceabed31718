"""What a request must get past before the app sees it: a deadline for its head and body
(slow-loris), size caps on its headers and body, a JSON content type, and well-formed HTTP.

Two layers, because uvicorn hands a request to the app only once its head is complete:
- `guarded_protocol` is uvicorn's h11 protocol with a deadline for each request's head, and
  OpenAI-shaped answers to malformed HTTP (uvicorn's own are plain text);
- `RequestGuard`, an ASGI middleware, checks the head and reads the body, within the deadline and
  the size cap, before the app runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import APIError

MAX_HEADER_BYTES = 16 * 1024  # all header names and values of one request
MAX_URL_BYTES = 8 * 1024
# What h11 buffers of an incomplete head before it gives up with a 400: above the limits the
# guard checks, so that a head of 20 KB gets the same clear 431 however TCP splits it.
H11_MAX_INCOMPLETE = 128 * 1024
_BODY_METHODS = ("POST", "PUT", "PATCH")


def _closing(error: APIError) -> APIError:
    # The client may still be sending what was refused: the connection cannot be reused.
    error.headers = {**(error.headers or {}), "Connection": "close"}
    return error


class _Refused(Exception):
    def __init__(self, error: APIError, reason: str) -> None:
        self.error, self.reason = error, reason


def _is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class RequestGuard:
    """Refuses, in OpenAI's shape and before the app runs: a URL over MAX_URL_BYTES (414),
    headers over MAX_HEADER_BYTES (431), both Content-Length and Transfer-Encoding (400), a body
    that is not JSON (415), a body over `limit` bytes (413, by Content-Length when given,
    otherwise while reading), and a body not in within `read_timeout` seconds (408)."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout: float, metrics: Any = None) -> None:
        self.app, self.limit, self.read_timeout, self.metrics = app, limit, read_timeout, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            self._check_head(scope)
            messages = await self._read_body(receive)
        except _Refused as refused:
            if self.metrics is not None:
                self.metrics.rejected.labels(refused.reason).inc()
            return await refused.error.response()(scope, _disconnected, send)
        replay = iter(messages)

        async def buffered() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, buffered, send)

    def _check_head(self, scope: Scope) -> None:
        url = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
        if url > MAX_URL_BYTES:
            raise _Refused(_closing(APIError(414, f"the URL is {url} bytes; at most {MAX_URL_BYTES} are read",
                                             code="uri_too_long")), "invalid")
        headers = scope["headers"]
        size = sum(len(name) + len(value) for name, value in headers)
        if size > MAX_HEADER_BYTES:
            raise _Refused(_closing(APIError(431, f"request headers are {size} bytes; at most {MAX_HEADER_BYTES} "
                                                  "are read", code="headers_too_large")), "invalid")
        values = dict(headers)
        if b"content-length" in values and b"transfer-encoding" in values:
            # Two framings for one body: proxies and servers may split it differently (smuggling).
            raise _Refused(_closing(APIError(400, "a request may not carry both Content-Length and "
                                                  "Transfer-Encoding", code="invalid_http")), "invalid")
        if scope["method"] in _BODY_METHODS and not _is_json(values.get(b"content-type")):
            given = values.get(b"content-type", b"none").decode("latin-1")
            raise _Refused(_closing(APIError(415, f"send the body as JSON with 'Content-Type: application/json' "
                                                  f"(got {given!r})", code="unsupported_media_type")), "invalid")
        length = values.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            raise self._too_large()

    def _too_large(self) -> _Refused:
        mb = self.limit / 2**20
        return _Refused(_closing(APIError(413, f"request body larger than {mb:g} MB (--max-body-mb)",
                                          code="body_too_large")), "too_large")

    async def _read_body(self, receive: Receive) -> list[Message]:
        """The request's body messages, read whole (the app parses it whole anyway)."""
        messages: list[Message] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise _Refused(_closing(APIError(408, f"the request body did not arrive within "
                                                      f"{self.read_timeout:g} s (--read-timeout)",
                                                 code="request_timeout")), "timeout") from None
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                raise self._too_large()
            if message["type"] != "http.request" or not message.get("more_body"):
                return messages


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}


def _raw_response(status: int, reason: str, error: APIError) -> bytes:
    """A whole HTTP/1.1 response, for the protocol layer (no request parsed, so h11 cannot build it)."""
    body = error.body()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's head (uvicorn has none: a client
    trickling a header a byte at a time would hold its connection forever) and JSON answers to
    malformed HTTP."""

    read_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Run the head deadline while h11 waits for a request's head (state IDLE)."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.read_timeout, self._head_timed_out)
        elif not waiting:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head arrived: say why the connection ends
            error = APIError(408, f"the request head did not arrive within {self.read_timeout:g} s "
                                  "(--read-timeout)", code="request_timeout")
            self.transport.write(_raw_response(408, "Request Timeout", error))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        error = APIError(400, f"malformed HTTP request: {msg}", code="invalid_http")
        self.transport.write(_raw_response(400, "Bad Request", error))
        self.transport.close()


def server_config(app: ASGIApp, host: str, port: int, read_timeout: float = 30.0, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for the app, with the guarded protocol."""
    protocol = type("GuardedH11", (GuardedH11Protocol,), {"read_timeout": read_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, h11_max_incomplete_event_size=H11_MAX_INCOMPLETE,
                          **options)
