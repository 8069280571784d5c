"""Garbage on the ZeroMQ inboxes: the codec refuses every malformed frame list
with DecodeError (never another exception, which would end a reader loop), and
the server's backend, the verify worker and the draft worker of a real
launched server all survive junk frames and messages of the wrong type, then
serve exactly as before."""

from __future__ import annotations

import os
import time
import types
import typing

import msgspec
import pytest
import zmq

import protocol.messages as messages
from protocol.codec import DecodeError, decode, encode
from tests.helpers import process_alive, wait_until
from tests.robustness.support import MODEL, health_latency

_pack = msgspec.msgpack.encode
_VALID = encode(messages.AbortRequest("junk-test"))[0]

JUNK_FRAMES = {
    "one empty frame": [b""],
    "not msgpack": [b"\xc1\xc1\xc1", b"\xc1"],
    "random bytes": [os.urandom(4096), os.urandom(64)],
    "untagged map": [_pack({"request_id": "x"}), _pack([])],
    "unknown tag": [_pack({"type": "LaunchMissiles", "request_id": "x"}), _pack([])],
    "wrong field type": [_pack({"type": "TokenOutput", "request_id": 5, "token_ids": "abc"}), _pack([])],
    "bad array header": [_VALID, _pack("not a list")],
    "header without frame": [_VALID, _pack([("float32", [4])])],
    "frame not whole items": [_VALID, _pack([("float32", [1])]), b"abc"],
    "negative shape": [_VALID, _pack([("float32", [0, -5])]), b""],
    "two unknown dims": [_VALID, _pack([("float32", [-1, -1])]), b"\0" * 4],
    "huge shape": [_VALID, _pack([("float32", [2**63 - 1, 2**63 - 1])]), b"\0" * 4],
    "shape overflows int64": [_VALID, _pack([("int64", [2**32, 2**32])]), b""],
    "forbidden dtype": [_VALID, _pack([("object", [1])]), b"\0" * 8],
    "deeply nested": [b"\x91" * 100_000 + b"\x90", _pack([])],
    "many frames": [_VALID, _pack([])] + [b""] * 200,
}


@pytest.mark.parametrize("frames", JUNK_FRAMES.values(), ids=JUNK_FRAMES.keys())
def test_codec_refuses_junk_with_decode_error(frames):
    with pytest.raises(DecodeError):
        decode(frames)


# -- live: junk into each process's inbox ----------------------------------------------------

# what each inbox legitimately receives (protocol/messages.py's flows, by name); every
# other message type is sent to it as junk
ACCEPTS = {
    "server": {"TokenOutput", "RequestFailed", "EngineStatus", "WorkerReady", "WorkerStats"},
    "verify": {"GenerateRequest", "AbortRequest", "DraftAvailability", "DraftTokens"},
    "draft": {"BeginDrafting", "VerifiedPrefix", "ReleaseRequest"},
}


def _placeholder(hint):
    """A harmless value of a field's type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return None if type(None) in args else _placeholder(args[0])
    origin = typing.get_origin(hint) or hint
    if isinstance(origin, type) and issubclass(origin, msgspec.Struct):
        return origin(**{f.name: _placeholder(f.type) for f in msgspec.structs.fields(origin)
                         if f.required})
    return {str: "junk-test", int: 0, float: 0.0, bool: False, list: [], dict: {}, tuple: ()}.get(origin)


def instances_of_every_message() -> dict[str, messages.Message]:
    out = {}
    for cls in typing.get_args(messages.Message):
        hints = typing.get_type_hints(cls)
        fields = {f.name: _placeholder(hints[f.name]) for f in msgspec.structs.fields(cls) if f.required}
        out[cls.__name__] = cls(**fields)
    return out


def wrong_type_messages(role: str) -> list[messages.Message]:
    return [m for name, m in instances_of_every_message().items() if name not in ACCEPTS[role]]


def completion(url: str, **fields) -> str:
    import httpx

    body = {"model": MODEL, "prompt": "Junk never hurts", "max_tokens": 16, "temperature": 0, **fields}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_every_process_survives_junk_on_its_inbox(robust_server, zmq_addresses):
    server = robust_server
    pids = server.worker_pids()
    assert len(pids) == 2
    greedy_before = completion(server.url)
    sampled_before = completion(server.url, temperature=1.0, seed=11)

    context = zmq.Context()
    try:
        for role, address in zmq_addresses.items():
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 2000)
            push.connect(address)
            for frames in JUNK_FRAMES.values():
                push.send_multipart(frames)
            for message in wrong_type_messages(role):
                push.send_multipart(encode(message))
            if role == "server":  # well-typed, but for requests that do not exist: dropped
                push.send_multipart(encode(messages.TokenOutput("no-such-request", [1, 2], "length")))
                push.send_multipart(encode(messages.RequestFailed("no-such-request", "junk")))
            push.close()
    finally:
        context.term()  # returns once every frame is handed over (linger)
    time.sleep(0.5)  # let the readers work through it

    assert [pid for pid in pids if not process_alive(pid)] == [] and server.process.poll() is None
    assert health_latency(server.url) < 1.0
    assert completion(server.url) == greedy_before
    assert completion(server.url, temperature=1.0, seed=11) == sampled_before
    assert completion(server.url, stream=False, n=2, temperature=1.0, seed=3)  # several requests at once
    assert server.worker_pids() == pids  # nothing died and was restarted
    assert wait_until(lambda: server.metric("tandem:num_requests_running") == 0, timeout_s=10, interval_s=0.05)
