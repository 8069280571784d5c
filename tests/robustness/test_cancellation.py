"""A client that hangs up (streaming or not) has its request aborted in the
workers: the running gauge returns to 0, the request never finishes in the
engine (no request_success, few generated tokens), the failure is counted as
client_disconnected, and a concurrent request's output is untouched."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.helpers import wait_until
from tests.robustness.support import MODEL, assert_serving, greedy

LONG = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 480, "temperature": 0, "n": 4}
OTHER_PROMPT, OTHER_TOKENS = "A second client asks", 40


def open_request(port: int, body: dict) -> socket.socket:
    """Send a request on a raw socket and read nothing: the client can vanish at will."""
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(raw), raw))
    return sock


def read_until_first_event(sock: socket.socket) -> None:
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream"
        received += chunk


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_disconnect_aborts_in_workers_and_spares_others(robust_server, stream):
    server = robust_server
    solo = greedy(server.url, OTHER_PROMPT, OTHER_TOKENS)
    assert wait_until(lambda: server.metric("tandem:num_requests_running") == 0, timeout_s=20, interval_s=0.02)
    success_before = sum(v for (name, _), v in server.metrics().items() if name == "tandem:request_success_total")
    tokens_before = server.metric("tandem:generation_tokens_total")
    gone_before = server.metric("tandem:request_failure_total", reason="client_disconnected")

    sock = open_request(server.port, {**LONG, "stream": stream})
    if stream:
        read_until_first_event(sock)
    assert wait_until(lambda: server.metric("tandem:num_requests_running") >= 1, timeout_s=20, interval_s=0.02)
    other: dict[str, str] = {}
    worker = threading.Thread(target=lambda: other.update(text=greedy(server.url, OTHER_PROMPT, OTHER_TOKENS)))
    worker.start()
    time.sleep(0.1)
    sock.close()  # hang up mid-generation
    worker.join(60)

    assert other["text"] == solo  # the concurrent request was untouched
    assert wait_until(lambda: server.metric("tandem:num_requests_running") == 0
                      and server.metric("tandem:num_requests_waiting") == 0, timeout_s=10, interval_s=0.02)
    metrics = server.metrics()
    success = sum(v for (name, _), v in metrics.items() if name == "tandem:request_success_total")
    assert success == success_before + 1  # only the other request finished; the 4 long choices were aborted
    generated = metrics[("tandem:generation_tokens_total", ())] - tokens_before
    assert generated < 4 * LONG["max_tokens"] / 2, generated
    assert server.metric("tandem:request_failure_total", reason="client_disconnected") == gone_before + 1
    assert_serving(server.url)
