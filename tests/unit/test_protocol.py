"""Wire codec: round trips, arrays as raw frames, malformed input refused."""

from __future__ import annotations

import typing

import msgspec
import numpy as np
import pytest
import zmq

from protocol.codec import DecodeError, decode, encode
from protocol.messages import (
    AbortRequest,
    BeginDrafting,
    DraftAvailability,
    DraftIdle,
    DraftPass,
    DraftPassCosts,
    TimeDraftPasses,
    DraftTokens,
    EngineStatus,
    GenerateRequest,
    Grammar,
    Message,
    ReleaseRequest,
    RequestFailed,
    SamplingParams,
    TokenOutput,
    VerifiedPrefix,
    WorkerReady,
    WorkerStats,
)
from protocol.sockets import Inbox, Outbox

MESSAGES = [
    GenerateRequest("a", [1, 2, 3], 16, SamplingParams(0.7, 0.9, 40, 123), [2], num_logprobs=2),
    AbortRequest("a"),
    TokenOutput("a", [5, 6], "stop", 4, 1, [-0.1, -2.0], [[(5, -0.1), (9, -3.0)], [(6, -2.0), (1, -2.5)]], 0.01),
    RequestFailed("a", "boom"),
    EngineStatus(2, 5),
    WorkerReady("verify", 42, "m", 49152, 2048),
    BeginDrafting("a", 0, [1, 2, 3], 4, SamplingParams(0.5, 1.0, 0, 7)),
    BeginDrafting("a", 0, [1, 2, 3], 4, SamplingParams(grammar=Grammar("json_schema", '{"type": "object"}', (2, 5))), 2),
    VerifiedPrefix("a", 7, 3, [4, 5], 4),
    DraftTokens("a", 7, 3, [4, 5]),
    DraftPass(16, 0.031),
    TimeDraftPasses(),
    DraftPassCosts([(1, 0.005), (4, 0.012)]),
    DraftIdle(),
    DraftAvailability(False),
    WorkerStats("draft", 1.5, 3.0, rollbacks=2, draft_tokens=9, easyspec={"fuzzy_passes": 3.0}),
    ReleaseRequest("a"),
]


def test_the_round_trip_list_holds_every_message_type():
    assert {type(m) for m in MESSAGES} == set(typing.get_args(Message))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    decoded = decode(encode(message))
    assert decoded.message == message
    assert type(decoded.message) is type(message)
    assert decoded.arrays == []


def test_arrays_travel_as_raw_frames():
    q = np.random.default_rng(0).random((3, 11), dtype=np.float32)
    frames = encode(DraftTokens("a", 1, 5, [1, 2, 3]), [q])
    assert len(frames) == 3 and bytes(frames[2]) == q.tobytes()
    decoded = decode([bytes(f) for f in frames])
    np.testing.assert_array_equal(decoded.arrays[0], q)


def test_no_pickle_on_the_wire():
    with pytest.raises(TypeError):
        encode(AbortRequest("a"), [np.array([object()], dtype=object)])


@pytest.mark.parametrize(
    "frames",
    [
        [b"garbage"],
        [b"\xff\x00", msgspec.msgpack.encode([])],
        [msgspec.msgpack.encode({"type": "NoSuchMessage"}), msgspec.msgpack.encode([])],
        [msgspec.msgpack.encode({"type": "AbortRequest"}), msgspec.msgpack.encode([])],  # missing field
        [msgspec.msgpack.encode({"type": "AbortRequest", "request_id": 5}), msgspec.msgpack.encode([])],
        [encode(AbortRequest("a"))[0], msgspec.msgpack.encode([("float32", [2])])],  # header without frame
        [encode(AbortRequest("a"))[0], msgspec.msgpack.encode([("float32", [3])]), b"\0" * 8],  # wrong size
        [encode(AbortRequest("a"))[0], msgspec.msgpack.encode([("object", [1])]), b"\0" * 8],
    ],
)
def test_malformed_frames_are_refused(frames):
    with pytest.raises(DecodeError):
        decode(frames)


def test_inbox_drops_malformed_and_keeps_going(tmp_path):
    address = f"ipc://{tmp_path}/inbox.sock"
    inbox = Inbox(address)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(address)
    outbox = Outbox(address)
    try:
        raw.send_multipart([b"not msgpack", b""])
        raw.send_multipart(encode(AbortRequest("ok")))  # one peer: order kept
        decoded = inbox.recv(timeout_ms=5000)
        assert decoded.message == AbortRequest("ok")
        assert inbox.num_malformed == 1
        assert inbox.recv(timeout_ms=50) is None
        outbox.send(AbortRequest("again"))
        assert inbox.recv(timeout_ms=5000).message == AbortRequest("again")
    finally:
        raw.close(linger=0)
        outbox.close()
        inbox.close()
