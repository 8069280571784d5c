"""ASGI layers around the app: the X-Request-Id of each request (echoed, and
in every log line written while serving it) and the gate that answers 503
while the models load.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.backend import BackendUnavailable
from server.errors import error_reply

REQUEST_ID_HEADER = "X-Request-Id"
# a client's id is kept when it is this short and plain (it goes into logs and a header)
_CLIENT_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII, no spaces

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("tandem_request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (the request being served, "-" outside one),
    for log formats that show %(request_id)s. Install it on the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s [%(request_id)s] %(message)s"


def log_with_request_ids(level: int = logging.INFO) -> None:
    """The server process's logging: one stderr handler whose lines carry the request id."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


class RequestIdMiddleware:
    """Each HTTP request gets an id: the client's `X-Request-Id` when it sends a
    plain one (1-128 visible ASCII characters), a fresh uuid4 hex otherwise. It is
    echoed in the response's `X-Request-Id` header and set in `request_id` for
    the logs (uvicorn's access line included) while the request is served.
    Under another RequestIdMiddleware (the launcher wraps the starting gate in
    one) it passes the request through: the outer one has named it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or request_id.get() != "-":  # not HTTP, or an outer layer gave the id
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        rid = given if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class StartingGate:
    """The app uvicorn serves from the first second: until `open(app)` every
    HTTP request (health checks included) is answered 503 with the start-up
    stage in OpenAI's error envelope, so clients and load balancers see that
    the server is coming up instead of a refused connection."""

    def __init__(self, stage: str = "starting"):
        self.stage = stage
        self._app: ASGIApp | None = None

    def open(self, app: ASGIApp) -> None:
        self._app = app

    @property
    def is_open(self) -> bool:
        return self._app is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            reply = error_reply(BackendUnavailable(f"Tandem is starting: {self.stage}; retry shortly"))
            response = reply.response()
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
