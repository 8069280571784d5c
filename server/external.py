"""Workers that run elsewhere: `tandem serve --external draft|verify`.

The launcher starts every role but the external one, which someone starts on
its own host with `tandem worker --role ROLE --config FILE`. It is known only
by its messages: every worker sends WorkerReady when its model is loaded and
then every second (workers.shell.start_heartbeat). An external worker is
up while its heartbeats arrive; silent for `server.heartbeat_timeout_s`, or
replaced by a new process (a new `instance`), it is down, and the launcher
reacts as it does to a local worker's exit (a draft: target-only rounds; a
verify worker: 503 and failed requests) until a heartbeat arrives again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

log = logging.getLogger("tandem.external")

POLL_S = 0.1


def start_command(role: str, config_file: str, mode: str) -> str:
    """How to start the external `role` for a server of `mode` serving `config_file`."""
    return f"tandem worker --role {role} --config {config_file} --mode {mode}"


def waiting_message(role: str, config, config_file: str, timeout_s: float) -> str:
    curve = "CURVE on" if config.curve.enabled else "CURVE off: trusted networks only"
    return (
        f"waiting up to {timeout_s:.0f} s for the external {role} worker "
        f"(inboxes: server {config.addresses.server}, verify {config.addresses.verify}, "
        f"draft {config.addresses.draft}; {curve}); start it with: "
        f"{start_command(role, config_file, config.speculation.mode)}"
    )


def not_connected_message(role: str, config, config_file: str, timeout_s: float) -> str:
    return (
        f"no {role} worker connected within {timeout_s:.0f} s (server.startup_timeout_s). Start it with "
        f"`{start_command(role, config_file, config.speculation.mode)}` on its host; it must reach "
        f"{config.addresses.server} and {config.addresses.verify if role == 'draft' else config.addresses.draft}, "
        f"bind {config.addresses.bind_of(role)}, and hold the same CURVE key pair "
        f"({config.curve.key_file or 'CURVE off'}); refused peers are logged by tandem.curve"
    )


def rank_messages(config, config_file: str, timeout_s: float) -> dict[str, str]:
    """role -> what to say about the ranks its worker waits for (rank groups spanning hosts:
    `rendezvous.external_ranks` of tensor_parallel for verify, of easyspec for draft)."""
    placement = config.placement_of_mode
    groups = {"verify": ("verify-rank", config.tensor_parallel, len(placement.targets) > 1)}
    if config.mode.layer_parallel_draft:
        groups["draft"] = ("draft-rank", config.easyspec, bool(placement.draft_ranks))
    messages = {}
    for role, (rank_role, section, grouped) in groups.items():
        ranks = section.rendezvous.external_ranks
        if grouped and ranks and role in config.mode.roles:
            commands = "; ".join(
                f"tandem worker --role {rank_role} --rank {r} --config {config_file} --mode {config.speculation.mode}"
                for r in ranks
            )
            messages[role] = (
                f"the {role} worker waits up to {timeout_s:.0f} s (server.startup_timeout_s) for its external "
                f"rank(s) {list(ranks)} at {section.rendezvous.address} (gloo, not encrypted); start each on its "
                f"host with: {commands}"
            )
    return messages


def connected(backend, role: str, timeout_s: float) -> bool:
    """A WorkerReady from `role` arrived within the last timeout_s."""
    seen = backend.last_seen.get(role)
    return seen is not None and time.monotonic() - seen <= timeout_s


async def watch(
    backend,
    role: str,
    timeout_s: float,
    went_down: Callable[[str, str], Awaitable[None]],
    back: Callable[[str], Awaitable[None]],
) -> None:
    """Supervise an external `role` by its heartbeats, forever (the Supervisor's task).

    `backend` is the launcher's backend: `ready[role]` (the latest WorkerReady)
    and `last_seen[role]` (monotonic time of the latest one).
    """
    known = backend.ready[role].instance
    while True:
        await asyncio.sleep(POLL_S)
        ready = backend.ready.get(role)
        silent_s = time.monotonic() - backend.last_seen.get(role, 0.0)
        if silent_s > timeout_s:
            reason = f"external {role} worker silent for {silent_s:.1f} s (no heartbeat; server.heartbeat_timeout_s)"
        elif ready is not None and ready.instance != known:
            reason = f"external {role} worker was replaced by a new process (pid {ready.pid})"
        else:
            continue
        await went_down(role, reason)
        known = await _reconnected(backend, role, time.monotonic())
        backend.restarts[role] = backend.restarts.get(role, 0) + 1
        await back(role)


async def _reconnected(backend, role: str, down_at: float) -> str:
    """Wait for a heartbeat sent after `down_at` from a worker that pairs with the
    others; its instance. One that cannot be paired is logged once and waited past."""
    refused: set[str] = set()
    while True:
        while backend.last_seen.get(role, 0.0) <= down_at:
            await asyncio.sleep(POLL_S)
        ready = backend.ready[role]
        mismatch = backend.vocab_mismatch()
        if mismatch is None:
            return ready.instance
        if ready.instance not in refused:
            refused.add(ready.instance)
            log.error("the %s worker that connected (pid %d) cannot be paired: %s", role, ready.pid, mismatch)
        down_at = time.monotonic()
