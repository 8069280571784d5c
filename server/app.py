"""The HTTP app: routes, error handlers, the body-size limit and the API key.

`create_app` is pure: everything an app uses (backend, tokenizer, settings, its
own Prometheus registry) hangs off the app it returns, so tests can build
several side by side. The launcher runs the result with uvicorn and owns the
backend's lifecycle and health.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from server.backend import Backend, BackendError, BackendUnavailable
from server.errors import APIError, RequestTooLarge, Unauthorized, error_reply
from server.metrics import Metrics
from server.middleware import REQUEST_ID_HEADER, RequestIdMiddleware
from server.serving import AppSettings, ServerContext
from server.serving_chat import ChatServing
from server.serving_completions import CompletionServing
from server.serving_tokens import TokenServing, version


def create_app(backend: Backend, tokenizer: Any, settings: AppSettings) -> FastAPI:
    """backend: a WorkerBackend (or a test's backend with the same interface); tokenizer: a transformers tokenizer."""
    metrics = Metrics(CollectorRegistry(), backend, settings.model_name, settings.max_model_len)
    ctx = ServerContext(backend=backend, tokenizer=tokenizer, settings=settings, metrics=metrics,
                        vocab_size=len(tokenizer), created=int(time.time()))
    completions, chat, tokens = CompletionServing(ctx), ChatServing(ctx), TokenServing(ctx)

    app = FastAPI(title="Tandem", summary="OpenAI-compatible speculative decoding server")
    app.state.tandem = ctx

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await completions.create(body, request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat.create(body, request)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=ctx.created,
                                         max_model_len=settings.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(body: dict[str, Any] = Body(...)) -> TokenizeResponse:
        return await tokens.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await tokens.detokenize(body)

    @app.get("/version")
    async def get_version() -> VersionResponse:
        return version()

    @app.get("/health")
    async def health() -> Response:
        if backend.healthy:
            return JSONResponse({"status": "ok"})
        return error_reply(BackendUnavailable(f"backend unavailable: {backend.unhealthy_reason}")).response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _install_error_handlers(app, metrics)
    if settings.api_key is not None:  # inside the body limit: a body is drained before any answer
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key, on_reject=metrics.record_failure)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=metrics.record_failure)
    app.add_middleware(RequestIdMiddleware)  # outside the limits: their refusals carry the id too
    if settings.allowed_origins:  # outermost: a preflight is answered before any check
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
        )
    return app


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def counted(request: Request, exc: Exception) -> Response:
        reply = error_reply(exc)
        metrics.record_failure(reply.reason)
        return reply.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        reply = error_reply(exc)
        if reply.status_code not in (404, 405):  # a body FastAPI could not parse counts; routing does not
            metrics.record_failure(reply.reason)
        return reply.response()

    for exc_type in (APIError, RequestValidationError, BackendError):
        app.add_exception_handler(exc_type, counted)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, counted)  # last resort: a 500 in the envelope


class BodySizeLimit:
    """413 for a request body over `max_bytes`, by Content-Length or by the
    bytes actually received (chunked bodies). The body is read here and
    replayed to the app; an oversized one is drained (up to a bound) before
    answering, so the client gets the 413 rather than a reset connection."""

    DRAIN_LIMIT = 64 * 1024 * 1024

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject: Callable[[str], None] = lambda reason: None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_large = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            too_large = too_large or size > self.max_bytes
            if not too_large:
                chunks.append(body)
            if not message.get("more_body", False) or size > self.DRAIN_LIMIT:
                break
        if too_large:
            shown = int(declared) if declared is not None and declared.isdigit() else size
            error = RequestTooLarge(f"request body of {shown} bytes exceeds the limit of {self.max_bytes} bytes")
            reply = error_reply(error)
            self.on_reject(reply.reason)
            await reply.response()(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# paths that need the API key when the server has one (besides everything under /v1)
KEYED_PATHS = ("/tokenize", "/detokenize")


class ApiKeyAuth:
    """Every path under /v1 (and /tokenize, /detokenize) needs `Authorization:
    Bearer <key>`; /health, /metrics, /version and the OpenAPI pages stay open.
    Keys are compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, on_reject: Callable[[str], None] = lambda reason: None):
        self.app = app
        self._key = api_key.encode()
        self.on_reject = on_reject

    def _authorized(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/v1" or path.startswith("/v1/") or path in KEYED_PATHS:
            given = dict(scope["headers"]).get(b"authorization")
            if given is None or not self._authorized(given):
                if given is None:
                    error = Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'")
                else:
                    error = Unauthorized("Incorrect API key provided")
                reply = error_reply(error)
                self.on_reject(reply.reason)
                await reply.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
