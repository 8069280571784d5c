"""Thin ZeroMQ helpers: every process binds one PULL inbox and PUSHes to peers."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import zmq

from protocol.codec import DecodeError, Decoded, decode, encode
from protocol.curve import CurveKeys, curve_client, curve_server
from protocol.messages import Message

log = logging.getLogger(__name__)


def prepare_address(address: str) -> None:
    """Create the directory an ipc:// address lives in."""
    if address.startswith("ipc://"):
        os.makedirs(os.path.dirname(address[len("ipc://"):]) or ".", exist_ok=True)


class Inbox:
    """A bound PULL socket. Malformed messages are logged and dropped.
    With `curve`, a CURVE server that admits only the authorized keys."""

    def __init__(self, address: str, context: zmq.Context | None = None, curve: CurveKeys | None = None):
        self._context = context or zmq.Context.instance()
        prepare_address(address)
        self.socket = self._context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve_server(self.socket, curve)
        self.socket.bind(address)
        self.address = address
        self.num_malformed = 0

    def recv(self, timeout_ms: int | None = None) -> Decoded | None:
        """The next well-formed message, or None when the timeout passes."""
        while True:
            if timeout_ms is not None and not self.socket.poll(timeout_ms):
                return None
            frames = self.socket.recv_multipart(copy=False)
            try:
                return decode([frame.buffer for frame in frames])
            except DecodeError as exc:
                self.num_malformed += 1
                log.warning("dropped a malformed message on %s: %s", self.address, exc)

    def close(self) -> None:
        self.socket.close(linger=0)


class Outbox:
    """A PUSH socket connected to a peer's inbox (with `curve`, as a CURVE client)."""

    def __init__(self, address: str, context: zmq.Context | None = None, curve: CurveKeys | None = None):
        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve_client(self.socket, curve)
        self.socket.connect(address)
        self.address = address

    def send(self, message: Message, arrays: Sequence[np.ndarray] = (), flags: int = 0) -> None:
        self.socket.send_multipart(encode(message, arrays), flags=flags, copy=False)

    def close(self) -> None:
        self.socket.close(linger=0)
