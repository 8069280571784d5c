"""Every failure the HTTP API reports, and the one function that maps an
exception to OpenAI's error envelope:

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

`error_reply` is the only place that decides a status code; the exception
handlers, the SSE error event and the body-size middleware all go through it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Sequence

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from server.backend import BackendError, BackendOverloaded, BackendUnavailable

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error we raise on purpose; subclasses fix the status and type."""

    status_code = 400
    type = "invalid_request_error"
    code: str | None = None
    reason = "invalid_request"  # the `reason` label of tandem:request_failure

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    """400: the request cannot be served as given."""


class ModelNotFound(APIError):
    status_code = 404
    code = "model_not_found"
    reason = "model_not_found"


class RequestTooLarge(APIError):
    status_code = 413
    code = "request_too_large"
    reason = "request_too_large"


class Unauthorized(APIError):
    """401: the server has an API key and the request did not carry it."""

    status_code = 401
    code = "invalid_api_key"
    reason = "unauthorized"


class RequestTimedOut(APIError):
    """408: the request ran past the server's per-request timeout and was
    aborted in the workers. (OpenAI's API has no such status; 408 keeps it
    apart from overload, 429, and from a worker being down, 503.)"""

    status_code = 408
    type = "timeout_error"
    code = "request_timeout"
    reason = "timeout"


class ClientDisconnected(Exception):
    """The client went away before its response was ready (nothing to answer)."""


class _AsciiJSONResponse(JSONResponse):
    """Escapes non-ASCII: an error message that quotes client input stays
    encodable even when that input held a lone surrogate."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


@dataclass(frozen=True)
class ErrorReply:
    status_code: int
    body: dict[str, Any]
    reason: str  # for tandem:request_failure
    headers: dict[str, str] | None = None

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body, status_code=self.status_code, headers=self.headers)

    def sse_event(self) -> str:
        return f"data: {json.dumps(self.body)}\n\n"


# headers that go with a status: when to retry, how to authenticate
_HEADERS = {429: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}


def _reply(status: int, message: str, type_: str, reason: str, param: str | None = None,
           code: str | None = None) -> ErrorReply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return ErrorReply(status, body, reason, _HEADERS.get(status))


def error_reply(exc: BaseException) -> ErrorReply:
    """Map any exception to its status code and envelope (the single mapping)."""
    if isinstance(exc, APIError):
        return _reply(exc.status_code, exc.message, exc.type, exc.reason, exc.param, exc.code)
    if isinstance(exc, (RequestValidationError, ValidationError)):
        return error_reply(validation_error(exc.errors()))
    # BackendOverloaded / BackendUnavailable subclass BackendError: test them first.
    if isinstance(exc, BackendOverloaded):
        return _reply(429, str(exc), "rate_limit_error", "overloaded", code="rate_limit_exceeded")
    if isinstance(exc, BackendUnavailable):
        return _reply(503, str(exc), "service_unavailable_error", "unavailable", code="service_unavailable")
    if isinstance(exc, BackendError):
        return _reply(500, str(exc), "server_error", "engine_error", code="engine_error")
    if isinstance(exc, HTTPException) and exc.status_code == 400 and exc.__cause__ is not None:
        return error_reply(body_parse_error(exc.__cause__))  # FastAPI's "error parsing the body"
    if isinstance(exc, HTTPException):  # routing: unknown path, wrong method
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _reply(exc.status_code, str(exc.detail), type_, "http_error")
    log.error("unexpected error while serving a request", exc_info=exc)
    return _reply(500, f"internal server error ({type(exc).__name__})", "server_error", "internal_error",
                  code="internal_error")


def body_parse_error(cause: BaseException) -> InvalidRequest:
    """Why a body could not be read as JSON, beyond a plain syntax error
    (FastAPI words those itself, with a position)."""
    if isinstance(cause, UnicodeDecodeError):
        return InvalidRequest(
            f"The request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position "
            f"{cause.start}); send JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return InvalidRequest("The JSON body is nested too deeply")
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int('1' * 5000): Python's int limit
        return InvalidRequest(f"The JSON body holds a number too large to read: {cause}")
    return InvalidRequest(f"The request body could not be read as JSON: {type(cause).__name__}: {cause}")


# -- pydantic / FastAPI validation errors -> one clear 400 ---------------------


def _param_path(loc: Sequence[Any]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or None


def validation_error(errors: Sequence[dict[str, Any]]) -> InvalidRequest:
    """The first validation error of a request body, worded for a client."""
    if not errors:
        return InvalidRequest("invalid request")
    err = errors[0]
    kind, loc, msg = err.get("type"), tuple(err.get("loc", ())), err.get("msg", "invalid value")
    ctx = err.get("ctx") or {}
    param = ctx.get("param") or _param_path(loc)
    if kind == "json_invalid":
        where = f" at character {loc[1]}" if len(loc) > 1 else ""
        return InvalidRequest(f"Malformed JSON body{where}: {ctx.get('error', msg)}")
    if kind in ("model_attributes_type", "model_type", "dict_type") and param is None:
        if isinstance(err.get("input"), (bytes, str)):
            return InvalidRequest(
                "The request body must be a JSON object sent with 'Content-Type: application/json'"
            )
        return InvalidRequest("The request body must be a JSON object")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if kind == "missing" and param is None:
        return InvalidRequest("The request body is empty; expected a JSON object")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param)
    if kind in ("unsupported_parameter", "invalid_parameter"):
        return InvalidRequest(msg, param=param)
    if param is None:
        return InvalidRequest(f"Invalid request: {msg}")
    return InvalidRequest(f"Invalid value for '{param}': {msg}", param=param)
