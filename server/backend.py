"""The server's side of the ZeroMQ link to the verify worker.

A per-request state object (an asyncio.Queue of outputs) bridges the HTTP
handlers and the socket reader task, SGLang style. The backend knows no text:
token ids in, token ids out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import zmq
import zmq.asyncio

from protocol.codec import DecodeError, decode, encode
from protocol.curve import CurveKeys, curve_client, curve_server
from protocol.messages import (
    AbortRequest,
    EngineStatus,
    GenerateRequest,
    Message,
    RequestFailed,
    TokenOutput,
    WorkerStats,
)

log = logging.getLogger(__name__)


class BackendError(RuntimeError):
    """A request could not be completed by the workers (answered 500)."""


class BackendUnavailable(BackendError):
    """The workers are not ready or one has died (answered 503)."""


class BackendOverloaded(BackendError):
    """Too many requests queued (answered 429)."""


@dataclass
class _RequestState:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False


@dataclass
class BackendStats:
    num_running: int = 0
    num_waiting: int = 0


class Backend(Protocol):
    """What the HTTP layer uses of a backend: WorkerBackend, or a test's in-process backend."""

    stats: BackendStats  # the verify worker's queue
    worker_stats: dict[str, WorkerStats]  # the latest report per role
    restarts: dict[str, int]  # worker restarts per role

    @property
    def healthy(self) -> bool: ...

    @property
    def unhealthy_reason(self) -> str | None: ...

    @property
    def num_pending(self) -> int: ...

    @property
    def max_pending(self) -> int | None:
        """The bound on requests queued or running (None: unbounded)."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]: ...


class BackendHealth:
    """Up, or down and why: the health half of an Backend."""

    def __init__(self, unhealthy_reason: str | None = None):
        self._unhealthy_reason = unhealthy_reason

    @property
    def healthy(self) -> bool:
        return self._unhealthy_reason is None

    @property
    def unhealthy_reason(self) -> str | None:
        return self._unhealthy_reason

    def set_healthy(self) -> None:
        self._unhealthy_reason = None

    def set_unhealthy(self, reason: str) -> None:
        self._unhealthy_reason = reason


class WorkerBackend(BackendHealth):
    """Submit GenerateRequests to the verify worker and stream their outputs.

    `inbox_address` is the server's PULL socket (workers push to it);
    `verify_address` is the verify worker's inbox; with `curve`, both are
    CURVE sockets (protocol/curve.py).
    """

    def __init__(self, inbox_address: str, verify_address: str, max_pending: int, curve: CurveKeys | None = None):
        super().__init__(unhealthy_reason="starting")
        self._curve = curve
        self._context = zmq.asyncio.Context.instance()
        self._inbox_address = inbox_address
        self._verify_address = verify_address
        self._max_pending = max_pending
        self._requests: dict[str, _RequestState] = {}
        self._reader: asyncio.Task | None = None
        self._push = None
        self._pull = None
        self.stats = BackendStats()
        self.worker_stats: dict[str, WorkerStats] = {}  # latest report per role
        self.restarts: dict[str, int] = {}  # kept by the launcher

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        if self._curve is not None:
            curve_server(self._pull, self._curve)
            curve_client(self._push, self._curve)
        self._pull.bind(self._inbox_address)
        self._push.connect(self._verify_address)
        self._reader = asyncio.create_task(self._read_loop(), name="backend-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.fail_all("server shutting down")
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)

    # -- health ------------------------------------------------------------

    def set_unhealthy(self, reason: str) -> None:
        """Mark the backend down and end every in-flight request with `reason`."""
        super().set_unhealthy(reason)
        self.fail_all(reason)

    def fail_all(self, reason: str) -> None:
        for request_id, state in list(self._requests.items()):
            state.queue.put_nowait(RequestFailed(request_id, reason))

    # -- requests ----------------------------------------------------------

    @property
    def num_pending(self) -> int:
        return len(self._requests)

    @property
    def max_pending(self) -> int:
        """The bound on requests queued or running (scheduler.max_running_requests + max_waiting_requests)."""
        return self._max_pending

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenOutput]:
        """Yield the request's outputs until one carries a finish_reason.

        Raises BackendUnavailable / BackendOverloaded before submitting, and
        BackendError if the workers fail the request. If the caller stops
        iterating early (client gone, stop string), the request is aborted in
        the workers.
        """
        if not self.healthy:
            raise BackendUnavailable(f"backend unavailable: {self._unhealthy_reason}")
        if len(self._requests) >= self._max_pending:
            raise BackendOverloaded(f"server busy: {len(self._requests)} requests in flight")
        if request.request_id in self._requests:
            raise BackendError(f"duplicate request id {request.request_id}")
        state = _RequestState()
        self._requests[request.request_id] = state
        try:
            await self._send(request)
            while True:
                output = await state.queue.get()
                if isinstance(output, RequestFailed):
                    state.finished = True
                    raise BackendError(output.message)
                if output.finish_reason is not None:
                    state.finished = True
                yield output
                if state.finished:
                    return
        finally:
            self._requests.pop(request.request_id, None)
            if not state.finished and self.healthy:
                await self._send(AbortRequest(request.request_id))

    async def _send(self, message: Message) -> None:
        await self._push.send_multipart(encode(message), copy=False)

    async def send_control(self, message: Message) -> None:
        """A message for the verify worker that belongs to no request (e.g. DraftAvailability)."""
        await self._send(message)

    async def _read_loop(self) -> None:
        """Every output of every request passes here: nothing a peer sends may end it."""
        while True:
            frames = await self._pull.recv_multipart(copy=False)
            try:
                message = decode([frame.buffer for frame in frames]).message
            except DecodeError as exc:
                log.warning("dropped a malformed message from a worker: %s", exc)
                continue
            except Exception:  # a codec bug: still not a reason to stop reading
                log.exception("dropped a message that could not be decoded")
                continue
            try:
                self._dispatch(message)
            except Exception:
                log.exception("dropped a %s that could not be handled", type(message).__name__)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, (TokenOutput, RequestFailed)):
            state = self._requests.get(message.request_id)
            if state is not None:  # else: the request was aborted; late outputs are dropped
                state.queue.put_nowait(message)
        elif isinstance(message, WorkerStats):
            self.worker_stats[message.role] = message
        elif isinstance(message, EngineStatus):
            self.stats = BackendStats(message.num_running, message.num_waiting)
        else:
            self.on_other_message(message)

    def on_other_message(self, message: Message) -> None:
        """WorkerReady and the like: handled by the launcher, which overrides this."""
        log.info("backend got %s", type(message).__name__)
