"""Heartbeat supervision of external workers (server/external.py) and the
launcher's handling of ready messages, in-process with a real LaunchedBackend
(no sockets are opened: start() is never called)."""

from __future__ import annotations

import asyncio
import logging
import time

from protocol.messages import WorkerReady
from server import external
from server.launcher import LaunchedBackend


def ready(role="draft", instance="a", vocab=100, mode="sd") -> WorkerReady:
    return WorkerReady(role, 7, "m", vocab, 512, mode=mode, instance=instance)


def backend() -> LaunchedBackend:
    return LaunchedBackend("ipc:///nowhere/a", "ipc:///nowhere/b", max_pending=4, mode="sd")


def test_ready_messages_record_heartbeats_and_refuse_another_mode(caplog):
    """Catches: heartbeats that do not refresh last_seen (a live worker taken for
    dead), and a worker started for another mode accepted (an easyspec server
    paired with a plain draft), or refused without a word."""
    b = backend()
    b.on_other_message(ready(instance="a"))
    first = b.last_seen["draft"]
    time.sleep(0.01)
    b.on_other_message(ready(instance="a"))
    assert b.last_seen["draft"] > first and b.ready["draft"].instance == "a"
    with caplog.at_level(logging.ERROR, logger="tandem.launcher"):
        b.on_other_message(ready(role="verify", instance="v", mode="amusd"))
        b.on_other_message(ready(role="verify", instance="v", mode="amusd"))
    assert "verify" not in b.ready
    assert len([r for r in caplog.records if "started for mode amusd" in r.getMessage()]) == 1


def test_watch_down_on_silence_and_on_replacement_back_on_heartbeat(monkeypatch):
    """Catches: a silent worker never declared down (requests would wait on it),
    a worker replaced by a new process (a restart faster than the timeout) not
    re-begun, a return never noticed, and a returning draft whose vocabulary
    differs from the target's taken back."""
    monkeypatch.setattr(external, "POLL_S", 0.01)
    b = backend()
    b.on_other_message(ready(role="verify", instance="v"))
    b.on_other_message(ready(instance="a"))
    events = []

    async def went_down(role, reason):
        events.append(("down", role, reason))

    async def back(role):
        events.append(("back", role, b.ready[role].instance))

    async def scenario():
        task = asyncio.create_task(external.watch(b, "draft", 1.0, went_down, back))
        await asyncio.sleep(1.3)  # no heartbeat: silent past 1 s
        assert [e[0] for e in events] == ["down"] and "silent" in events[0][2]
        b.on_other_message(ready(instance="c", vocab=99))  # cannot be paired: stays down
        await asyncio.sleep(0.1)
        assert len(events) == 1
        b.on_other_message(ready(instance="b"))
        await asyncio.sleep(0.1)
        assert events[1] == ("back", "draft", "b")
        b.on_other_message(ready(instance="d"))  # a new process before the timeout
        await asyncio.sleep(0.05)
        b.on_other_message(ready(instance="d"))
        await asyncio.sleep(0.1)
        task.cancel()
        return events

    events = asyncio.run(scenario())
    assert [e[0] for e in events] == ["down", "back", "down", "back"]
    assert "replaced" in events[2][2] and events[3] == ("back", "draft", "d")
    assert b.restarts["draft"] == 2
