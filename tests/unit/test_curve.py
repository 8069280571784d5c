"""CURVE on Tandem's sockets (protocol/curve.py): real ZeroMQ sockets over tcp on loopback."""

from __future__ import annotations

import logging
import threading

import pytest
import zmq

from configs.loader import CurveConfig
from protocol.curve import ensure_key_pair, keys_for, load_keys, write_key_pair
from protocol.messages import AbortRequest
from protocol.sockets import Inbox, Outbox
from tests.helpers import free_port


@pytest.fixture
def pair(tmp_path):
    _, secret = write_key_pair(tmp_path / "deploy.key_secret")
    return load_keys(secret)


@pytest.fixture
def stranger(tmp_path):
    _, secret = write_key_pair(tmp_path / "stranger.key_secret")
    return load_keys(secret)


def contexts():
    """Separate contexts, as separate processes have (each its own ZAP handler)."""
    return zmq.Context(), zmq.Context()


def test_same_pair_passes(pair):
    """Catches: CURVE options set on the wrong side (server/client) or too late
    (after bind/connect), which makes even the right peers fail the handshake."""
    server_ctx, client_ctx = contexts()
    address = f"tcp://127.0.0.1:{free_port()}"
    inbox = Inbox(address, server_ctx, curve=pair)
    outbox = Outbox(address, client_ctx, curve=pair)
    try:
        outbox.send(AbortRequest("r1"))
        decoded = inbox.recv(timeout_ms=5000)
        assert decoded is not None and decoded.message == AbortRequest("r1")
        assert inbox.socket.curve_server
    finally:
        inbox.close(), outbox.close()


def test_wrong_client_key_is_refused_and_logged(pair, stranger, caplog):
    """Catches: an inbox that admits any client that knows its (public) server key,
    i.e. no ZAP handler checking client keys; and a refusal that leaves no trace."""
    server_ctx, client_ctx = contexts()
    address = f"tcp://127.0.0.1:{free_port()}"
    inbox = Inbox(address, server_ctx, curve=pair)
    # the impostor knows the inbox's public key (it is public) but holds another pair
    impostor = client_ctx.socket(zmq.PUSH)
    impostor.curve_secretkey, impostor.curve_publickey, impostor.curve_serverkey = (
        stranger.secret, stranger.public, pair.public,
    )
    impostor.connect(address)
    try:
        with caplog.at_level(logging.WARNING, logger="tandem.curve"):
            impostor.send_multipart([b"junk"])  # queued for the connection, never delivered
            assert inbox.recv(timeout_ms=1500) is None
        refusals = [r.getMessage() for r in caplog.records if "refused a ZeroMQ peer" in r.getMessage()]
        assert refusals and stranger.public.decode() in refusals[0] and "127.0.0.1" in refusals[0]
    finally:
        inbox.close(), impostor.close(linger=0)


def test_inbox_with_another_pair_gets_nothing(pair, stranger):
    """Catches: an outbox that sends to whoever binds its peer's address (no
    server key check): an impostor inbox must not receive a message."""
    server_ctx, client_ctx = contexts()
    address = f"tcp://127.0.0.1:{free_port()}"
    impostor = Inbox(address, server_ctx, curve=stranger)
    outbox = Outbox(address, client_ctx, curve=pair)
    try:
        outbox.send(AbortRequest("secret"), flags=zmq.NOBLOCK)
        assert impostor.recv(timeout_ms=1500) is None
    finally:
        impostor.close(), outbox.close()


def test_key_files(tmp_path):
    """Catches: overwriting a deployment's pair, two processes that make a pair at
    once ending with different keys, and a missing key file failing late or vaguely."""
    path = tmp_path / "keys" / "d.key_secret"
    made = []
    threads = [threading.Thread(target=lambda: made.append(ensure_key_pair(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(made) == [False, False, False, True]
    assert (path.stat().st_mode & 0o777) == 0o600 and path.with_name("d.key").exists()
    first = load_keys(path)
    with pytest.raises(FileExistsError):
        write_key_pair(path)
    assert load_keys(path) == first
    with pytest.raises(ValueError, match="tandem keys"):
        keys_for(CurveConfig(enabled=True, key_file=str(tmp_path / "absent.key_secret")))
    made_now = keys_for(CurveConfig(enabled=True, key_file=str(tmp_path / "new.key_secret"), create_missing=True))
    assert made_now.authorized == {made_now.public}
    assert keys_for(CurveConfig()) is None
