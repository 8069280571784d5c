"""Where the ranks of a rank group meet, and how rank 0 knows the ranks it did not spawn.

Built on torch.distributed's stores (no cluster manager of our own):

- `open_store`: a FileStore (every rank on one host, the default) or a TCPStore
  served by rank 0 (`tcp://HOST:PORT`: ranks on other hosts). Rank 0 listens
  at the bind address (a socket it binds itself and hands to the TCPStore, so
  `tcp://10.0.0.5:29500` listens on that interface only, `tcp://0.0.0.0:29500`
  on all); the others connect to the address.
- `gloo_device`: the interface gloo binds its pairs on. Gloo's default is the
  address the host name resolves to, which is wrong in a network namespace or
  on a host whose name resolves to 127.0.0.1; here it is the address this host
  uses to reach rank 0 (the kernel's route), or GLOO_SOCKET_IFNAME's interface.
- The handshake (`introduce` on a follower, `Admission` on rank 0): a follower
  claims its rank (first come; a second claimant is refused), says what it runs
  (`identity`: a follower of another model or split is refused with both named)
  and, when the deployment has a secret (the CURVE key pair), proves it holds it
  (an HMAC of rank 0's nonce; the secret never travels). Rank 0 answers each
  claim; a refusal is logged on both sides and rank 0 goes on waiting.
- External ranks (`ExternalRank`): started on their own (`tandem worker --role
  verify-rank --rank N`), they are known by store keys: `ready/N` once loaded,
  `error/N` with a traceback, `beat/N` counted up every second by a thread of
  their own. Rank 0 declares one dead when it reports an error or its count
  stops for `heartbeat_timeout_s`; a dead peer in a pass is gloo's error.

Not encrypted: the store and gloo's tensors travel in clear text (CURVE covers
only ZeroMQ). Across hosts, use a private network or a WireGuard tunnel.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from .channel import RankError

log = logging.getLogger("tandem.ranks")

HEARTBEAT_INTERVAL_S = 1.0


def split_address(address: str) -> tuple[str, int]:
    """tcp://HOST:PORT -> (HOST, PORT)."""
    host, _, port = address[len("tcp://") :].rpartition(":")
    return host.strip("[]"), int(port)


def local_address_towards(host: str, port: int) -> str:
    """The address of this host's interface that reaches host:port (no packet is sent)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)
        return probe.getsockname()[0]


def open_store(init_method: str, bind: str, rank: int, world: int, timeout: datetime.timedelta):
    """Rank 0 serves (tcp) or creates (file) the store; the others join it."""
    import torch.distributed as dist

    if init_method.startswith("file://"):
        return dist.FileStore(init_method[len("file://") :], world)
    if not init_method.startswith("tcp://"):
        raise ValueError(f"unsupported init_method {init_method!r} (use file://... or tcp://host:port)")
    host, port = split_address(init_method)
    if rank != 0:
        try:
            return dist.TCPStore(host, port, world, False, timeout)
        except RuntimeError as e:  # DistStoreError: nothing listens there (yet)
            raise RankError(f"rank {rank}: rank 0's rendezvous at {init_method} not reachable: {e}") from e
    bind_host, bind_port = split_address(bind or init_method)
    family = socket.getaddrinfo(bind_host, bind_port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind_host, bind_port))
        listener.listen(64)
    except OSError as e:
        listener.close()
        raise RankError(f"rank 0 cannot listen at {bind or init_method} for the other ranks: {e}") from e
    # rank 0's own client connects through the loopback when it listens on every interface
    own = "127.0.0.1" if bind_host in ("0.0.0.0", "::") else bind_host
    return dist.TCPStore(own, bind_port, world, True, timeout, wait_for_workers=False, master_listen_fd=listener.detach())


def gloo_device(init_method: str):
    """The gloo device of a tcp:// rendezvous (None: gloo's default, right on one host)."""
    import torch.distributed as dist

    if not init_method.startswith("tcp://"):
        return None
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"])
    return dist.ProcessGroupGloo.create_device(hostname=local_address_towards(*split_address(init_method)))


def _proof(secret: bytes | None, nonce: str, rank: int) -> str:
    return "" if secret is None else hmac.new(secret, f"{nonce}/{rank}".encode(), hashlib.sha256).hexdigest()


def introduce(store, rank: int, identity: str, secret: bytes | None, timeout_s: float) -> None:
    """A follower claims `rank` and waits for rank 0's answer; RankError if refused."""
    deadline = time.monotonic() + timeout_s
    _wait(store, ["nonce"], deadline, f"rank {rank}: rank 0 published no nonce")
    nonce = store.get("nonce").decode()
    attempt = uuid.uuid4().hex
    hello = json.dumps(dict(attempt=attempt, identity=identity, proof=_proof(secret, nonce, rank),
                            host=socket.gethostname(), pid=os.getpid()))  # fmt: skip
    if store.compare_set(f"hello/{rank}", "", hello).decode() != hello:
        raise RankError(f"rank {rank} is already taken by another process (is it started twice?)")
    verdict_key = f"verdict/{rank}/{attempt}"
    _wait(store, [verdict_key], deadline, f"rank {rank}: rank 0 did not answer its hello")
    verdict = store.get(verdict_key).decode()
    if verdict != "ok":
        raise RankError(f"rank {rank} refused by rank 0: {verdict}")


def _wait(store, keys: list[str], deadline: float, what: str) -> None:
    while not store.check(keys):  # polled: a store's wait() logs a warning each time it times out
        if time.monotonic() > deadline:
            raise RankError(f"{what} in time")
        time.sleep(0.05)


class Admission:
    """Rank 0's side of the handshake: nonce out, each claim checked and answered."""

    def __init__(self, store, world: int, identity: str, secret: bytes | None):
        self.store, self.world, self.identity, self.secret = store, world, identity, secret
        self.nonce = secrets.token_hex(16)
        self.admitted: set[int] = set()
        self.refusals: dict[int, str] = {}  # the last refusal of each rank, for the timeout message
        store.set("nonce", self.nonce)

    def admit_pending(self) -> None:
        for rank in range(1, self.world):
            if rank in self.admitted or not self.store.check([f"hello/{rank}"]):
                continue
            hello = json.loads(self.store.get(f"hello/{rank}"))
            reason = self._refusal(rank, hello)
            self.store.set(f"verdict/{rank}/{hello['attempt']}", reason or "ok")
            if reason:
                log.warning("refused rank %d from %s (pid %s): %s", rank, hello["host"], hello["pid"], reason)
                self.refusals[rank] = f"{reason} (from {hello['host']}, pid {hello['pid']})"
                self.store.delete_key(f"hello/{rank}")  # the rank is free for the next claimant
            else:
                self.admitted.add(rank)

    def _refusal(self, rank: int, hello: dict) -> str:
        if not hmac.compare_digest(hello["proof"], _proof(self.secret, self.nonce, rank)):
            return ("it does not hold this deployment's key pair (curve.key_file)" if self.secret is not None
                    else "it holds a key pair (curve.enabled) that rank 0 does not have")  # fmt: skip
        if hello["identity"] != self.identity:
            return f"it runs {hello['identity']}, rank 0 runs {self.identity} (start both from one config)"
        return ""


def start_heartbeat(store, rank: int, on_loss) -> None:
    """Count `beat/RANK` up every HEARTBEAT_INTERVAL_S from a daemon thread; call on_loss()
    once the store (rank 0) is unreachable."""

    def beat() -> None:
        while True:
            try:
                store.add(f"beat/{rank}", 1)
            except Exception as e:  # noqa: BLE001 - rank 0 (the store's server) is gone
                on_loss(e)
                return
            time.sleep(HEARTBEAT_INTERVAL_S)

    threading.Thread(target=beat, name=f"rank{rank}-heartbeat", daemon=True).start()


@dataclass
class ExternalRank:
    """Rank 0's view of a rank it did not spawn: store keys instead of a process."""

    rank: int
    store: object
    heartbeat_timeout_s: float
    _count: int = -1
    _changed: float = 0.0

    def error(self) -> str | None:
        key = f"error/{self.rank}"
        return self.store.get(key).decode() if self.store.check([key]) else None

    def ready(self) -> bool:
        """True once loaded; RankError if it reported an error."""
        self.check_error()
        return self.store.check([f"ready/{self.rank}"])

    def check_error(self) -> None:
        error = self.error()
        if error is not None:
            raise RankError(f"external rank {self.rank} failed:\n{error}")

    def check(self) -> None:
        """RankError if it reported an error or its heartbeats stopped."""
        self.check_error()
        count, now = self.store.add(f"beat/{self.rank}", 0), time.monotonic()
        if count != self._count:
            self._count, self._changed = count, now
        elif now - self._changed > self.heartbeat_timeout_s:
            raise RankError(f"external rank {self.rank}: no heartbeat for {now - self._changed:.0f} s")


def deployment_secret(curve) -> bytes | None:
    """The handshake's secret: the deployment's CURVE secret key (configs' `curve` section),
    which every host already holds; None with CURVE off."""
    from protocol.curve import keys_for

    keys = keys_for(curve)
    return None if keys is None else keys.secret
