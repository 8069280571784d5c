"""How the ranks of a rank group talk (a layer-parallel draft, a tensor-parallel target):
commands from rank 0, sums, gathers.

Two implementations of one small interface:

- `ShmChannel`: one host, CPU. A shared-memory file with per-rank slots and
  sequence flags; waiting peers spin briefly, then sleep. Idle followers block on
  a semaphore (no CPU use while the target verifies on the same cores).
  Measured on the 2-core box: ~10-16 us for an all-reduce of [1, 576], against
  0.25-2.8 ms for gloo's (see bench/easyspec.py), so it is the CPU default.
- `DistChannel`: torch.distributed, met at a file store (one host) or rank 0's
  TCPStore (tcp://, ranks on other hosts; rendezvous.py). Commands on a gloo group (a follower's idle
  wait never times out, rank 0's send does; a dead peer closes its sockets, which
  gloo reports), data on a group of the data backend (gloo on CPU, NCCL on CUDA)
  with a timeout.

Every exchange is counted and timed (`ExchangeStats`), on each rank: the time
includes waiting for the slowest peer, i.e. load imbalance shows up here.
"""

from __future__ import annotations

import datetime
import mmap
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

MAX_INLINE_TOKENS = 64  # DistChannel: tokens carried in the fixed-size command broadcast
CMD_HEADER = 16  # ints before the tokens in a command


class RankError(RuntimeError):
    """A rank of a rank group died, failed or did not answer in time."""


class RankExit(Exception):
    """Raised on a follower when rank 0 is gone: leave quietly."""


@dataclass
class ExchangeStats:
    """Per kind of exchange: how many, seconds spent (incl. waiting for peers), bytes sent."""

    count: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    bytes: dict = field(default_factory=dict)

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.bytes[kind] = self.bytes.get(kind, 0) + nbytes

    @property
    def total_count(self) -> int:
        return sum(self.count.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def snapshot(self) -> dict:
        return {
            kind: {"count": self.count[kind], "seconds": self.seconds[kind], "bytes": self.bytes[kind]}
            for kind in sorted(self.count)
        }

    def reset(self) -> None:
        self.count.clear()
        self.seconds.clear()
        self.bytes.clear()


class Channel:
    """The interface (see the module docstring). `rank` 0 sends commands; all ranks reduce."""

    rank: int
    world: int
    stats: ExchangeStats

    def send_command(self, command: Sequence[int]) -> None:
        raise NotImplementedError

    def recv_command(self) -> list[int]:
        raise NotImplementedError

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the ranks, in place, in rank order (identical on every rank); returns t."""
        raise NotImplementedError

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's t (same shape and dtype everywhere); others get None."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- shared memory -------------------------------------------------------------

_LINE = 8  # int64s per 64-byte cache line: each flag on its own line


@dataclass(frozen=True)
class ShmLayout:
    """What a follower needs to attach (picklable)."""

    path: str
    world: int
    slot_bytes: int
    max_command: int
    timeout_s: float
    root_pid: int

    @property
    def ctrl_ints(self) -> int:
        return _LINE * (1 + 2 * self.world)

    @property
    def size(self) -> int:
        return 8 * (self.ctrl_ints + self.max_command) + 2 * self.world * self.slot_bytes


class ShmChannel(Channel):
    CMD_SEQ, CMD_LEN = 0, 1

    def __init__(
        self,
        layout: ShmLayout,
        rank: int,
        doorbells: Sequence,  # one multiprocessing Semaphore per follower (rank 1..)
        *,
        check_peers: Callable[[], None] | None = None,
        spin_s: float = 0.002,
        command_spin_s: float = 0.0005,
    ):
        self.layout = layout
        self.rank, self.world = rank, layout.world
        self.stats = ExchangeStats()
        self._doorbells = list(doorbells)
        self._check_peers = check_peers or (lambda: None)
        self._spin_s = spin_s  # waiting for peers inside a pass: they are close behind
        # a follower waiting for the next command spins this long, then sleeps on its
        # semaphore: drafting passes follow each other closely, but between rounds the
        # cores belong to the verifier
        self._command_spin_s = command_spin_s
        create = rank == 0
        fd = os.open(layout.path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, layout.size)
            self._mm = mmap.mmap(fd, layout.size)
        finally:
            os.close(fd)
        n_ctrl = layout.ctrl_ints
        self._ctrl = np.ndarray((n_ctrl,), dtype=np.int64, buffer=self._mm, offset=0)
        self._cmd = np.ndarray((layout.max_command,), dtype=np.int64, buffer=self._mm, offset=8 * n_ctrl)
        data_offset = 8 * (n_ctrl + layout.max_command)
        self._data = torch.frombuffer(
            self._mm, dtype=torch.uint8, offset=data_offset, count=2 * self.world * layout.slot_bytes
        ).view(2, self.world, layout.slot_bytes)
        self._seq = 0  # collectives done
        self._cmd_seq = 0  # commands sent / received

    def _flag(self, r: int) -> int:
        return _LINE * (1 + r)

    def _ack(self, r: int) -> int:
        return _LINE * (1 + self.world + r)

    def _wait(self, index: int, value: int, what: str) -> None:
        """Wait until ctrl[index] >= value: spin, then nap; check peers; time out."""
        ctrl = self._ctrl
        if ctrl[index] >= value:
            return
        start = time.perf_counter()
        spin_until = start + self._spin_s
        deadline = start + self.layout.timeout_s
        next_check = start + 0.05
        n = 0
        while ctrl[index] < value:
            n += 1
            if n & 255:
                continue
            now = time.perf_counter()
            if now > spin_until:
                time.sleep(50e-6)
            if now > next_check:
                next_check = now + 0.05
                self._check_peers()
                if now > deadline:
                    raise RankError(
                        f"rank {self.rank}: no answer within {self.layout.timeout_s:.0f} s while waiting for {what}"
                    )

    def _wait_all(self, value: int, what: str) -> None:
        for r in range(self.world):
            if r != self.rank:
                self._wait(self._flag(r), value, f"{what} from rank {r}")

    def _slot(self, parity: int, r: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return self._data[parity, r, :nbytes].view(dtype)

    def _nbytes(self, t: torch.Tensor) -> int:
        nbytes = t.numel() * t.element_size()
        if nbytes > self.layout.slot_bytes:
            raise ValueError(f"exchange of {nbytes} bytes exceeds the channel's slot of {self.layout.slot_bytes}")
        return nbytes

    def send_command(self, command: Sequence[int]) -> None:
        t0 = time.perf_counter()
        n = len(command)
        if n > self.layout.max_command:
            raise ValueError(f"command of {n} ints exceeds the channel's {self.layout.max_command}")
        for r in range(1, self.world):  # every follower has copied the previous command
            self._wait(self._ack(r), self._cmd_seq, f"command ack from rank {r}")
        self._cmd[:n] = command
        self._ctrl[self.CMD_LEN] = n
        self._cmd_seq += 1
        self._ctrl[self.CMD_SEQ] = self._cmd_seq
        for bell in self._doorbells:
            bell.release()
        self.stats.add("command", time.perf_counter() - t0, 8 * n)

    def recv_command(self) -> list[int]:
        target = self._cmd_seq + 1
        bell = self._doorbells[self.rank - 1]
        ctrl = self._ctrl
        spin_until = time.perf_counter() + self._command_spin_s
        while ctrl[self.CMD_SEQ] < target and time.perf_counter() < spin_until:
            pass
        while not bell.acquire(timeout=0.2):  # idle: block, but notice a dead rank 0
            if os.getppid() != self.layout.root_pid:
                raise RankExit("rank 0 is gone")
        n = int(ctrl[self.CMD_LEN])
        command = self._cmd[:n].tolist()
        self._cmd_seq = target
        ctrl[self._ack(self.rank)] = target
        return command

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        nbytes = self._nbytes(t)
        self._seq += 1
        seq, parity = self._seq, self._seq & 1
        self._slot(parity, self.rank, nbytes, t.dtype).copy_(t.reshape(-1))
        self._ctrl[self._flag(self.rank)] = seq
        self._wait_all(seq, "all_reduce")
        out = t.view(-1)
        if self.world == 2:
            torch.add(self._slot(parity, 0, nbytes, t.dtype), self._slot(parity, 1, nbytes, t.dtype), out=out)
        else:
            out.copy_(self._slot(parity, 0, nbytes, t.dtype))
            for r in range(1, self.world):
                out.add_(self._slot(parity, r, nbytes, t.dtype))
        self.stats.add("all_reduce", time.perf_counter() - t0, nbytes)
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        t0 = time.perf_counter()
        nbytes = self._nbytes(t)
        self._seq += 1
        seq, parity = self._seq, self._seq & 1
        if self.rank != 0:
            self._slot(parity, self.rank, nbytes, t.dtype).copy_(t.reshape(-1))
            self._ctrl[self._flag(self.rank)] = seq
            self._wait(self._flag(0), seq, "gather by rank 0")  # rank 0 has read the slot
            self.stats.add("gather", time.perf_counter() - t0, nbytes)
            return None
        self._wait_all(seq, "gather")
        parts = [t] + [self._slot(parity, r, nbytes, t.dtype).view(t.shape).clone() for r in range(1, self.world)]
        self._ctrl[self._flag(0)] = seq
        self.stats.add("gather", time.perf_counter() - t0, 0)
        return parts

    def barrier(self) -> None:
        t0 = time.perf_counter()
        self._seq += 1
        self._ctrl[self._flag(self.rank)] = self._seq
        self._wait_all(self._seq, "barrier")
        self.stats.add("barrier", time.perf_counter() - t0, 0)

    def close(self) -> None:
        self._ctrl = self._cmd = self._data = None
        try:
            self._mm.close()
        except BufferError:  # a tensor view still alive somewhere: the mapping goes with the process
            pass
        if self.rank == 0:
            unlink_quietly(self.layout.path)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def shm_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


# -- torch.distributed ---------------------------------------------------------


@dataclass(frozen=True)
class DistRendezvous:
    init_method: str  # file:///path (a FileStore) or tcp://host:port (a TCPStore served by rank 0)
    world: int
    data_backend: str  # "gloo" or "nccl"
    timeout_s: float
    idle_timeout_s: float = 7 * 24 * 3600.0  # commands: a follower may wait this long between rounds
    join_timeout_s: float = 300.0  # every rank must reach the rendezvous within this (process start-up)
    bind: str = ""  # tcp://IP:PORT rank 0 listens at ("" = init_method's)
    external: tuple[int, ...] = ()  # ranks rank 0 did not spawn (started on their own, perhaps elsewhere)
    identity: str = ""  # what the followers run: a follower that runs something else is refused
    secret: bytes | None = None  # the deployment's secret the followers prove they hold (rendezvous.py)

    def describe_missing(self, ranks: list[int]) -> str:
        external = [r for r in ranks if r in self.external]
        where = f" at {self.init_method}" if self.init_method.startswith("tcp://") else ""
        return f"rank(s) {ranks}{' (external: ' + str(external) + ')' if external else ''} did not join the rendezvous{where}"


def _gloo(store, rank: int, world: int, timeout: datetime.timedelta, device):
    """A gloo group on `device` (None: gloo's default device)."""
    import torch.distributed as dist

    if device is None:
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [device]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world, options)


class DistChannel(Channel):
    """torch.distributed process groups of our own (the process's default group stays free)."""

    def __init__(
        self, rendezvous: DistRendezvous, rank: int, device: torch.device, check_peers: Callable[[], None] | None = None
    ):
        import torch.distributed as dist

        self._dist = dist
        self.rendezvous = rendezvous
        self.rank, self.world = rank, rendezvous.world
        self.device = device
        self.stats = ExchangeStats()
        from .rendezvous import gloo_device, open_store

        timeout = datetime.timedelta(seconds=rendezvous.timeout_s)
        join_timeout = datetime.timedelta(seconds=rendezvous.join_timeout_s)
        store = open_store(rendezvous.init_method, rendezvous.bind, rank, rendezvous.world, join_timeout)
        self.store = store
        self._join(store, check_peers or (lambda: None))
        device = gloo_device(rendezvous.init_method)
        # gloo sends only once the peer has posted its receive, so rank 0's command
        # to a hung follower would wait as long as the group's timeout: rank 0 gets the
        # data timeout, followers (idle between rounds) the long one. Each process's
        # group object carries its own timeout.
        cmd_timeout = timeout if rank == 0 else datetime.timedelta(seconds=rendezvous.idle_timeout_s)
        self._cmd = _gloo(dist.PrefixStore("cmd/", store), rank, rendezvous.world, cmd_timeout, device)
        data_store = dist.PrefixStore("data/", store)
        if rendezvous.data_backend == "gloo":
            self._data = _gloo(data_store, rank, rendezvous.world, timeout, device)
        elif rendezvous.data_backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._data = dist.ProcessGroupNCCL(data_store, rank, rendezvous.world, options)
        else:
            raise ValueError(f"unknown data backend {rendezvous.data_backend!r}")
        self._header = torch.zeros(CMD_HEADER + MAX_INLINE_TOKENS + 1, dtype=torch.int64)

    def _join(self, store, check_peers: Callable[[], None]) -> None:
        """Meet every rank at the store (up to join_timeout_s, checking the peers): followers
        claim their rank and rank 0 admits them (rendezvous.py), so that the groups'
        connections, made next under the short data timeout, do not wait on a peer still
        starting (importing torch on a busy machine takes seconds)."""
        from .rendezvous import Admission, introduce

        r = self.rendezvous
        deadline = time.monotonic() + r.join_timeout_s
        admission = Admission(store, self.world, r.identity, r.secret) if self.rank == 0 else None
        if admission is None:
            introduce(store, self.rank, r.identity, r.secret, r.join_timeout_s)
        store.set(f"joined/{self.rank}", "1")
        keys = [f"joined/{rank}" for rank in range(self.world)]
        while not store.check(keys):  # polled: a store's wait() logs a warning each time it times out
            if admission is not None:
                admission.admit_pending()
            check_peers()
            if time.monotonic() > deadline:
                missing = [rank for rank, key in enumerate(keys) if not store.check([key])]
                refusals = admission.refusals if admission is not None else {}
                refused = "".join(f"; rank {k} was refused: {v}" for k, v in sorted(refusals.items()))
                raise RankError(f"{r.describe_missing(missing)} within {r.join_timeout_s:.0f} s{refused}")
            time.sleep(0.05)

    def report_error(self, text: str) -> None:
        """Tell rank 0 (through the store) why this follower fails: an external rank's only way."""
        try:
            self.store.set(f"error/{self.rank}", text)
        except Exception:  # noqa: BLE001 - the store may be gone too
            pass

    def _run(self, kind: str, nbytes: int, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except RuntimeError as e:  # gloo: "Connection closed by peer", timeouts
            raise RankError(f"rank {self.rank}: {kind} failed (a rank died or timed out): {e}") from e
        self.stats.add(kind, time.perf_counter() - t0, nbytes)
        return out

    def _broadcast(self, t: torch.Tensor) -> None:
        opts = self._dist.BroadcastOptions()
        opts.rootRank = 0
        self._cmd.broadcast([t], opts).wait()

    def send_command(self, command: Sequence[int]) -> None:
        n = len(command)
        header = self._header
        header[0] = n
        inline = min(n, header.numel() - 1)
        header[1 : 1 + inline] = torch.tensor(command[:inline], dtype=torch.int64)

        def send():
            self._broadcast(header)
            if n > inline:
                self._broadcast(torch.tensor(command[inline:], dtype=torch.int64))

        self._run("command", 8 * n, send)

    def recv_command(self) -> list[int]:
        header = self._header

        def recv():
            self._broadcast(header)
            n = int(header[0])
            inline = min(n, header.numel() - 1)
            command = header[1 : 1 + inline].tolist()
            if n > inline:
                rest = torch.empty(n - inline, dtype=torch.int64)
                self._broadcast(rest)
                command += rest.tolist()
            return command

        try:
            return self._run("command", 0, recv)
        except RankError as e:
            raise RankExit(str(e)) from e

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.SUM
        self._run("all_reduce", nbytes, lambda: self._data.allreduce([t], opts).wait())
        return t

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        opts = self._dist.GatherOptions()
        opts.rootRank = 0
        if self.rank == 0:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            self._run("gather", 0, lambda: self._data.gather([parts], [t], opts).wait())
            return parts
        self._run("gather", nbytes, lambda: self._data.gather([], [t], opts).wait())
        return None

    def barrier(self) -> None:
        flag = torch.zeros(1, device=self.device)
        opts = self._dist.AllreduceOptions()
        self._run("barrier", 0, lambda: self._data.allreduce([flag], opts).wait())

    def close(self) -> None:
        for pg in (self._data, self._cmd):
            try:
                pg.shutdown()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._data = self._cmd = self.store = None


def all_reduce_in_chunks(channel: Channel, max_elements: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The channel's in-place all-reduce, in pieces of at most max_elements (None: whole)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        flat = t.view(-1)
        if max_elements is None or flat.numel() <= max_elements:
            channel.all_reduce_(flat)
        else:
            for lo in range(0, flat.numel(), max_elements):
                channel.all_reduce_(flat[lo : lo + max_elements])
        return t

    return reduce
