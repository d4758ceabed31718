"""The HTTP layer: OpenAI's routes over one `Engine`. It parses and checks requests, hands them
to the engine, and streams back what the engine emits; it never touches the model."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware

from ..engine import ChatRequest, Delta, Engine, Failed, Finished, ImagesDone, Progress, RowDone
from ..engine.requests import Event
from ..errors import ContextLengthError, ImageLoadError, JanusError
from ..processing.images_io import DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, open_header
from .errors import APIError, as_api_error, failure_response, install_error_handlers
from .guard import RequestGuard
from .images import load_image_url
from .schemas import ChatCompletionRequest, ImageGenerationRequest, Message as ChatMessage, error_responses

# Seconds between checks that a client waiting for a whole answer is still there.
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerState:
    ready: bool = False
    draining: bool = False


@dataclass
class ServerOptions:
    model_name: str
    api_key: str | None = None
    cors_origins: Sequence[str] = ()
    allow_remote_images: bool = False
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # width x height, read from the header before decoding
    read_timeout: float = 30.0  # seconds a client has for a request's head, and then for its body
    # Off: special-token strings in request text are ordinary text (see processing.plain_text).
    allow_special_tokens: bool = False


class EventQueue:
    """Carries a request's events from the engine's thread into this event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self, request: Request | None = None) -> Event | None:
        """The next event; None when `request`'s client has gone away meanwhile."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return None


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _png_b64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(engine: Engine, options: ServerOptions, state: ServerState | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. The engine must be started (and is stopped) by the caller."""
    state = state or ServerState(ready=True)
    metrics = engine.metrics
    app = FastAPI(title="janusvl", version=_version(), docs_url=None, redoc_url=None)
    app.state.engine, app.state.server = engine, state
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestGuard, limit=options.max_body_bytes, read_timeout=options.read_timeout,
                       metrics=metrics)
    install_error_handlers(app, metrics)
    auth = [Depends(_require_key(options.api_key, metrics))]
    size = engine.model.config.vision_config.image_size
    image_size = f"{size}x{size}"

    def check_model(model: str | None) -> None:
        if model is not None and model != options.model_name:
            raise APIError(404, f"model {model!r} is not served here; this server serves "
                                f"{options.model_name!r}", "not_found_error", "model", "model_not_found")

    def submit(request: Any) -> EventQueue:
        if state.draining:
            metrics.rejected.labels("unavailable").inc()
            raise APIError(503, "the server is shutting down and takes no new requests",
                           "service_unavailable", code="shutting_down")
        events = EventQueue()
        request.emit = events.put
        try:
            engine.submit(request)
        except JanusError as exc:
            raise as_api_error(exc) from None
        return events

    page = (Path(__file__).parent / "static" / "index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        """The web page (chat and image generation); it calls the API below like any client."""
        return HTMLResponse(page)

    @app.get("/health", responses={503: {"description": "draining (or not ready)"}})
    async def health() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {}}}, **error_responses(401)})
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=auth, responses=error_responses(401))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model",
                                            "created": _STARTED, "owned_by": "janusvl"}]}

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None,
              responses={200: {"content": {"application/json": {}, "text/event-stream": {}}},
                         **error_responses(*API_ERRORS)})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        _check_unsupported(body)
        messages = await run_in_threadpool(_to_messages, body.messages, options)
        length_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        try:
            req = await run_in_threadpool(
                engine.chat_request, messages, max_new_tokens=body.max_completion_tokens or body.max_tokens,
                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, n=body.n, seed=body.seed,
                stop=body.stop, plain_text=not options.allow_special_tokens, length_name=length_name)
        except JanusError as exc:
            raise as_api_error(exc, _chat_param(exc, length_name)) from None
        events = submit(req)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream_chat(req, events, head, usage), media_type="text/event-stream")
        return await _collect_chat(req, events, head, request)

    @app.post("/v1/images/generations", dependencies=auth, response_model=None,
              responses={200: {"content": {"application/json": {}, "text/event-stream": {}}},
                         **error_responses(*API_ERRORS)})
    async def image_generations(body: ImageGenerationRequest, request: Request) -> Response:
        check_model(body.model)
        if body.size != image_size:
            raise APIError(400, f"size {body.size!r} is not supported; Janus generates {image_size} images",
                           param="size", code="unsupported_size")
        if body.response_format != "b64_json":
            raise APIError(400, f"response_format {body.response_format!r} is not supported; use b64_json",
                           param="response_format", code="invalid_value")
        try:
            req = await run_in_threadpool(engine.image_request, body.prompt, n=body.n,
                                          cfg_weight=body.cfg_weight, temperature=body.temperature, seed=body.seed,
                                          plain_text=not options.allow_special_tokens)
        except JanusError as exc:
            raise as_api_error(exc, "prompt") from None
        events = submit(req)
        if body.stream:
            return StreamingResponse(_stream_images(req, events, image_size), media_type="text/event-stream")
        return await _collect_images(req, events, request)

    _openapi_without_422(app)
    return app


# What a POST route may answer besides 200 (validation errors are 400s, not FastAPI's 422s).
API_ERRORS = (400, 401, 404, 408, 413, 414, 415, 429, 431, 500, 503)


def _openapi_without_422(app: FastAPI) -> None:
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = make()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


_STARTED = int(time.time())


def _version() -> str:
    from .. import __version__

    return __version__


def _require_key(api_key: str | None, metrics: Any) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    return check


def _check_unsupported(body: ChatCompletionRequest) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_parameter")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > 16 or not all(stops):
        raise APIError(400, "stop must be at most 16 non-empty strings", param="stop", code="invalid_value")


def _chat_param(exc: JanusError, length_name: str) -> str | None:
    """The request field a chat error is about: the messages, or the answer's length when the
    messages alone fit the context (OpenAI names "messages" for context errors)."""
    if isinstance(exc, ContextLengthError):
        return length_name if exc.prompt_tokens < exc.context else "messages"
    return "messages" if isinstance(exc, ImageLoadError) else None


def _to_messages(messages: list[ChatMessage], options: ServerOptions) -> list[dict[str, Any]]:
    """OpenAI messages -> janusvl's, with every image URL turned into its bytes (checked to be an
    image of a size the server takes before anything decodes it, by the library's own check)."""
    limits = ImageLimits(max_pixels=options.max_image_pixels, max_bytes=options.max_body_bytes)
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role in ("system", "developer") else message.role
        if not isinstance(message.content, list):
            out.append({"role": role, "content": message.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            where = f"messages[{i}].content[{j}].image_url.url"
            try:
                data = load_image_url(part.image_url.url, options.allow_remote_images, options.max_body_bytes)
                open_header(data, where, limits).close()
            except ImageLoadError as exc:
                raise as_api_error(exc, where) from None
            parts.append({"type": "image", "image": data})
        out.append({"role": role, "content": parts})
    return out


async def _collect_chat(req: ChatRequest, events: EventQueue, head: dict[str, Any], request: Request) -> Response:
    texts, reasons = [""] * req.n, ["length"] * req.n
    try:
        while True:
            event = await events.get(request)
            if event is None:  # the client left: nothing keeps running for it
                return Response(status_code=499)
            if isinstance(event, Delta):
                texts[event.row] += event.text
            elif isinstance(event, RowDone):
                reasons[event.row] = event.finish_reason
            elif isinstance(event, Failed):
                return failure_response(event.error)
            elif isinstance(event, Finished):
                break
    finally:
        req.cancel()  # a no-op once finished; frees the rows if this handler was interrupted
    choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
    return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                         "usage": _usage(event.prompt_tokens, event.completion_tokens)})


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _stream_chat(req: ChatRequest, events: EventQueue, head: dict[str, Any],
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

    try:
        started = False
        while True:
            event = await events.get()
            if not started and isinstance(event, (Delta, RowDone)):  # the first token is drawn
                started = True
                for row in range(req.n):
                    yield chunk([{"index": row, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None}])
            if isinstance(event, Delta):  # one chunk per token ("" while its text is held back)
                yield chunk([{"index": event.row, "delta": {"content": event.text}, "finish_reason": None}])
            elif isinstance(event, RowDone):
                yield chunk([{"index": event.row, "delta": {}, "finish_reason": event.finish_reason}])
            elif isinstance(event, Failed):
                yield _sse(as_api_error(event.error).payload())
                break
            elif isinstance(event, Finished):
                if include_usage:
                    yield chunk([], usage=_usage(event.prompt_tokens, event.completion_tokens))
                break
        yield _sse("[DONE]")
    finally:
        req.cancel()  # the client went away mid-stream (or we are done): drop the rows


async def _collect_images(req: Any, events: EventQueue, request: Request) -> Response:
    try:
        while True:
            event = await events.get(request)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Failed):
                return failure_response(event.error)
            if isinstance(event, ImagesDone):
                data = await run_in_threadpool(lambda: [{"b64_json": _png_b64(im)} for im in event.images])
                return JSONResponse({"created": int(time.time()), "data": data})
    finally:
        req.cancel()


async def _stream_images(req: Any, events: EventQueue, size: str) -> AsyncIterator[str]:
    try:
        last = 0
        while True:
            event = await events.get()
            if isinstance(event, Progress):
                # About 100 progress events per image job, plus the last step.
                if event.step - last >= max(event.total // 100, 1) or event.step == event.total:
                    last = event.step
                    yield _sse({"type": "image_generation.progress", "step": event.step, "total": event.total})
            elif isinstance(event, ImagesDone):
                encoded = await run_in_threadpool(lambda: [_png_b64(im) for im in event.images])
                for i, b64 in enumerate(encoded):
                    yield _sse({"type": "image_generation.completed", "index": i, "b64_json": b64,
                                "size": size, "output_format": "png", "created_at": int(time.time())})
            elif isinstance(event, Failed):
                yield _sse(as_api_error(event.error).payload())
                break
            elif isinstance(event, Finished):
                break
        yield _sse("[DONE]")
    finally:
        req.cancel()


__all__ = ["create_app", "ServerOptions", "ServerState", "APIError"]
