"""A rank group: one model spread over D processes, rank 0 in the caller's process.

The one bootstrap of every multi-process model: the layer-parallel draft
(workers/easyspec/ranks.py) and the tensor-parallel target
(workers/tensor_parallel.py) both build on it. Rank 0 lives in the caller's
process (a worker, or a test); it spawns ranks 1..D-1 here, each of which
places itself, opens the channel, runs its `FollowerProgram` (loads its share
of the model) and then follows: every command rank 0 sends (commands.py) is
decoded and handed to the program's state, except the generic ones (Call,
Barrier, Shutdown), which are handled here.

Ranks on other hosts: with a tcp:// `rendezvous` address, the ranks in its
`external_ranks` are not spawned but started on their own (`run_external_rank`,
behind `tandem worker --role verify-rank|draft-rank --rank N`) and meet rank 0
there (rendezvous.py: handshake, ready/error keys, heartbeats).

Failures: a follower that dies or raises is noticed by rank 0 at its next
exchange (process liveness checks while waiting, heartbeats for an external
rank, and a timeout), which raises RankError; the group is then down
(`healthy` is False) and every later call raises at once. Followers exit when
rank 0 goes away (an external rank's command then waits for the next rank 0).
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from configs.choices import CHANNELS, check_choice
from configs.loader import RendezvousConfig
from workers.shell import apply_placement, die_with_parent, name_process

from .channel import Channel, DistChannel, DistRendezvous, RankError, RankExit, ShmChannel, ShmLayout, shm_directory, unlink_quietly
from .commands import Barrier, Call, Command, Shutdown, max_words, pack, unpack
from .rendezvous import ExternalRank, start_heartbeat

log = logging.getLogger("tandem.ranks")


@dataclass(frozen=True)
class RankPlacement:
    """Where a rank runs; the same fields as configs' DevicePlacement (either works)."""

    device: str = "cpu"
    cores: tuple[int, ...] = ()
    threads: int = 0


class FollowerState(Protocol):
    rank: int

    def handle(self, command: Command) -> None:
        """Carry out one model command (not Call, Barrier or Shutdown)."""


class FollowerProgram(Protocol):
    """What a follower runs (picklable: it travels to the spawned process)."""

    name: str  # the process name prefix (`ps`): tandem-<name><rank>

    def start(self, rank: int, channel: Channel, device: torch.device) -> FollowerState:
        """Load this rank's share of the model."""


def pick_channel(kind: str, device: torch.device, across_hosts: bool = False) -> str:
    """The channel a group on `device` uses for the configured kind (one of CHANNELS);
    `across_hosts`: some ranks may run on other hosts, where shared memory cannot reach."""
    check_choice("rank channel", kind, CHANNELS)
    if kind == "auto":
        return "nccl" if device.type == "cuda" else "gloo" if across_hosts else "shm"
    if kind == "shm" and across_hosts:
        raise ValueError("the shared-memory channel cannot reach ranks on other hosts; use gloo or nccl")
    if kind == "shm" and device.type != "cpu":
        raise ValueError("the shared-memory channel exchanges CPU tensors; use gloo or nccl for GPU ranks")
    return kind


def program_identity(program: FollowerProgram) -> str:
    """What a follower runs, as the ranks compare it at the rendezvous: the program's fields
    but its checkpoint's directory (which may differ between hosts)."""
    fields = {f.name: getattr(program, f.name) for f in dataclasses.fields(program)}
    if "checkpoint" in fields:
        fields["checkpoint"] = dataclasses.replace(fields["checkpoint"], path="")
    return repr(fields)


def _follower_main(rank, program: FollowerProgram, placement, channel_setup, doorbells, conn):
    """Entry point of ranks 1..D-1 (spawned by rank 0, or by `run_external_rank`)."""
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    root_pid = channel_setup.root_pid if isinstance(channel_setup, ShmLayout) else None
    external = not isinstance(channel_setup, ShmLayout) and rank in channel_setup.external
    channel = None
    try:
        name_process(f"tandem-{program.name}{rank}")
        device = apply_placement(placement)

        def check_root():
            if os.getppid() != (root_pid or os.getppid()):
                raise RankExit("rank 0 is gone")

        if isinstance(channel_setup, ShmLayout):
            channel = ShmChannel(channel_setup, rank, doorbells, check_peers=check_root)
        else:
            channel = DistChannel(channel_setup, rank, device)
        state = program.start(rank, channel, device)
        if external:  # rank 0 knows it by the store: ready, then a heartbeat while the group lasts
            channel.store.set(f"ready/{rank}", str(os.getpid()))
            start_heartbeat(channel.store, rank, on_loss=lambda e: os._exit(0))
        conn.send(("ready", os.getpid()))
        with torch.inference_mode():
            _follow(state, channel)
        channel.close()
        conn.send(("bye", os.getpid()))
    except RankExit:
        pass
    except BaseException:  # noqa: BLE001 - reported to rank 0, then exit non-zero
        if external and channel is not None:
            channel.report_error(traceback.format_exc())
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)


def _follow(state: FollowerState, channel: Channel) -> None:
    while True:
        command = unpack(channel.recv_command())
        if isinstance(command, Shutdown):
            return
        if isinstance(command, Call):
            module, _, name = command.function.partition(":")
            getattr(importlib.import_module(module), name)(state, *command.args)
            channel.barrier()
        elif isinstance(command, Barrier):
            channel.barrier()
        else:
            state.handle(command)


def dist_rendezvous(
    kind: str, world: int, rendezvous: RendezvousConfig, timeout_s: float, join_timeout_s: float,
    identity: str, secret: bytes | None, local: str = "",
) -> DistRendezvous:
    """The torch.distributed rendezvous of a group on channel `kind` (gloo or nccl): the
    config's tcp:// address when it has one, else `local` (a file:// store on this host).
    Rank 0 and an external rank build it alike from one config."""
    return DistRendezvous(
        rendezvous.address or local, world, "nccl" if kind == "nccl" else "gloo", timeout_s,
        join_timeout_s=join_timeout_s, bind=rendezvous.bind, external=rendezvous.external_ranks,
        identity=identity, secret=secret,
    )  # fmt: skip


def external_rank_setup(program: FollowerProgram, placements: Sequence, rank: int, section, config):
    """(program, placement, rendezvous) of `rank`, started on its own, of a group over
    `placements` (rank 0 first) configured by `section` (a config's tensor_parallel or
    easyspec: channel, timeout_s, rendezvous): what run_external_rank takes, built from
    the config as rank 0 builds it."""
    from .rendezvous import deployment_secret

    kind = pick_channel(section.channel, torch.device(placements[rank].device), across_hosts=True)
    setup = dist_rendezvous(kind, len(placements), section.rendezvous, section.timeout_s,
                            config.server.startup_timeout_s, program_identity(program), deployment_secret(config.curve))  # fmt: skip
    return program, placements[rank], setup


class RankGroup:
    """Rank 0's handle on the D ranks: spawn, command, check, shut down.

    Every method raises RankError once a rank has failed; `healthy` says so without raising.
    Subclasses send their model commands through `_call`.
    """

    def __init__(
        self,
        program: FollowerProgram,
        world: int,
        device: torch.device,
        *,
        placements: Sequence = (),
        channel: str = "auto",
        slot_bytes: int = 1 << 16,
        max_command_tokens: int = 8192,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        rendezvous: RendezvousConfig = RendezvousConfig(),
        secret: bytes | None = None,
        heartbeat_timeout_s: float = 10.0,
    ):
        if world < 2:
            raise ValueError("a rank group needs at least 2 devices (use the single-process model for 1)")
        placements = list(placements) or [RankPlacement()] * world
        if len(placements) != world:
            raise ValueError(f"{len(placements)} rank placements for a group of {world} ranks")
        if any(not 1 <= r < world for r in rendezvous.external_ranks):
            raise ValueError(f"external ranks {list(rendezvous.external_ranks)} in a group of {world} ranks")
        self.world = world
        self.rendezvous, self.secret, self.heartbeat_timeout_s = rendezvous, secret, heartbeat_timeout_s
        self.identity = program_identity(program)
        self._local_ranks = [r for r in range(1, world) if r not in rendezvous.external_ranks]
        self._external: list[ExternalRank] = []
        self.timeout_s = timeout_s
        self.max_command_tokens = max_command_tokens
        self.slot_bytes = -(-max(slot_bytes, 64) // 4096) * 4096
        self.startup_timeout_s = startup_timeout_s
        self._failure: str | None = None
        self._closed = False
        self._procs: list = []
        self._conns: list = []
        self._rendezvous_dir = tempfile.mkdtemp(prefix=f"tandem-{program.name}-")
        self.channel_kind = pick_channel(channel, device, across_hosts=bool(rendezvous.address))
        ctx = multiprocessing.get_context("spawn")
        channel_setup = self._channel_setup(program.name)
        doorbells = [ctx.Semaphore(0) for _ in self._local_ranks] if isinstance(channel_setup, ShmLayout) else []
        self._shm_path = channel_setup.path if isinstance(channel_setup, ShmLayout) else None

        atexit.register(self.close)
        try:
            if isinstance(channel_setup, ShmLayout):  # rank 0 creates the file the others attach to
                self.channel: Channel = ShmChannel(channel_setup, 0, doorbells, check_peers=self._check_peers)
            for rank in self._local_ranks:
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_follower_main,
                    args=(rank, program, placements[rank], channel_setup, doorbells, child),
                    name=f"tandem-{program.name}-rank{rank}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            if not isinstance(channel_setup, ShmLayout):
                self.channel = DistChannel(channel_setup, 0, device, check_peers=self._check_peers)
                self._external = [ExternalRank(r, self.channel.store, heartbeat_timeout_s) for r in rendezvous.external_ranks]
            self._while_followers_start()
            self._await_ready(startup_timeout_s)
            if self._shm_path:  # everyone has it mapped: no file left behind, whatever happens next
                unlink_quietly(self._shm_path)
        except BaseException:
            self.close()
            raise

    def _channel_setup(self, name: str) -> ShmLayout | DistRendezvous:
        """What every rank needs to open the channel of kind self.channel_kind."""
        if self.channel_kind == "shm":
            path = os.path.join(shm_directory(), f"tandem-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            return ShmLayout(path, self.world, self.slot_bytes, max_words(self.max_command_tokens), self.timeout_s, os.getpid())
        return dist_rendezvous(
            self.channel_kind, self.world, self.rendezvous, self.timeout_s, self.startup_timeout_s,
            self.identity, self.secret, local=f"file://{os.path.join(self._rendezvous_dir, 'rendezvous')}",
        )  # fmt: skip

    # -- lifecycle -----------------------------------------------------------

    def _while_followers_start(self) -> None:
        """Rank 0's own start-up work, done while the followers load (a subclass's hook)."""

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for peer in self._external:
            while not peer.ready():
                if time.monotonic() > deadline:
                    raise RankError(f"external rank {peer.rank} joined but did not load its model within {timeout_s:.0f} s")
                time.sleep(0.1)
            peer.check()  # its heartbeat count starts now
        for rank, proc, conn in zip(self._local_ranks, self._procs, self._conns):
            while True:
                if conn.poll(0.1):
                    kind, payload = conn.recv()
                    if kind == "ready":
                        break
                    raise RankError(f"rank {rank} failed to start:\n{payload}")
                if not proc.is_alive():
                    raise RankError(f"rank {rank} exited with code {proc.exitcode} while starting")
                if time.monotonic() > deadline:
                    raise RankError(f"rank {rank} did not start within {timeout_s:.0f} s")

    def _check_peers(self) -> None:
        """Raise RankError if a follower died or reported an error (external: or fell silent)."""
        for peer in self._external:
            peer.check()
        for rank, proc, conn in zip(self._local_ranks, self._procs, self._conns):
            detail = ""
            try:
                while conn.poll():
                    kind, payload = conn.recv()
                    if kind == "error":
                        detail = f":\n{payload}"
            except (EOFError, OSError):
                pass
            if detail or not proc.is_alive():
                proc.join(timeout=0.5)
                raise RankError(f"rank {rank} (pid {proc.pid}) failed, exit code {proc.exitcode}{detail}")

    @property
    def healthy(self) -> bool:
        """True while every rank is alive and none has failed (no exchange: cheap)."""
        if self._failure is not None or self._closed:
            return False
        try:
            self._check_peers()
        except RankError as e:
            self._failure = str(e)
            return False
        return True

    def lost_ranks(self) -> list[str]:
        """The followers known to be gone, without reading their reports (safe from another thread)."""
        lost = [f"rank {r} (pid {p.pid})" for r, p in zip(self._local_ranks, self._procs) if not p.is_alive()]
        for peer in self._external:
            try:
                peer.check()
            except RankError as e:
                lost.append(str(e).splitlines()[0])
        return lost

    @property
    def pids(self) -> list[int]:
        """The pids of the followers this process spawned (not the external ranks)."""
        return [p.pid for p in self._procs]

    def _guard(self):
        if self._closed:
            raise RankError("the rank group is shut down")
        if self._failure is not None:
            raise RankError(f"the rank group is down: {self._failure}")

    def _call(self, fn, *args):
        """Run a command (arguments already validated). Any failure once a command is out
        leaves the ranks out of step, so it takes the group down."""
        self._guard()
        try:
            return fn(*args)
        except BaseException as e:
            # a follower crashing mid-exchange surfaces here as the channel's error (gloo:
            # "connection closed"), or as another one; name the follower if it is known to be gone
            try:
                self._check_peers()
            except RankError as dead:
                self._failure = str(dead)
                raise dead from e
            self._failure = str(e) if isinstance(e, RankError) else f"rank 0 failed during a command: {e!r}"
            raise

    def send(self, command: Command) -> None:
        """Send one command to every follower (inside a `_call`)."""
        self.channel.send_command(pack(command))

    def ping(self) -> float:
        """A round trip through every rank; returns seconds (raises RankError on a dead rank)."""

        def go():
            t0 = time.perf_counter()
            self.send(Barrier())
            self.channel.barrier()
            return time.perf_counter() - t0

        return self._call(go)

    def call(self, function: str, *args: int | str) -> None:
        """Run function(follower_state, *args) on every follower ("module:name"; for
        looking inside the ranks: tests, debugging) and wait until all have."""

        def go():
            self.send(Call(function, list(args)))
            self.channel.barrier()

        self._call(go)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the followers (politely, then by force) and free the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        channel = getattr(self, "channel", None)
        if channel is not None and self._failure is None and not self.lost_ranks():
            try:
                self.send(Shutdown())
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                log.warning("rank %s (pid %s) did not stop; terminating it", proc.name, proc.pid)
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
        self._external = []  # they hold the store: let it go with the channel
        if channel is not None:
            channel.close()
        if self._shm_path:
            unlink_quietly(self._shm_path)
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._rendezvous_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def stats(self):
        return self.channel.stats


def run_external_rank(program: FollowerProgram, rank: int, placement, setup: DistRendezvous, *, restart_delay_s: float = 1.0):
    """`tandem worker --role verify-rank|draft-rank --rank N`: follower `rank` of a group whose
    rank 0 runs elsewhere, for good. Each membership is a child process (as rank 0 would
    spawn it): it joins the rendezvous, loads its share, follows until rank 0 closes the
    group or goes away, and exits; then the next child waits for the next rank 0 (a
    restarted worker). Runs until interrupted."""
    ctx = multiprocessing.get_context("spawn")
    delay = restart_delay_s
    while True:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_follower_main, args=(rank, program, placement, setup, [], child),
                           name=f"tandem-{program.name}-rank{rank}", daemon=True)  # fmt: skip
        proc.start()
        child.close()
        log.info("rank %d (pid %d) joining the rendezvous at %s", rank, proc.pid, setup.init_method)
        while proc.is_alive() or parent.poll():
            if not parent.poll(0.5):
                continue
            try:
                kind, payload = parent.recv()
            except EOFError:
                break
            if kind == "ready":
                log.info("rank %d ready: following rank 0 at %s", rank, setup.init_method)
                delay = restart_delay_s
            elif kind == "bye":
                log.info("rank %d: rank 0 closed the group", rank)
            else:
                log.warning("rank %d failed: %s", rank, payload.strip().splitlines()[-1])
                log.debug("%s", payload)
                delay = min(2 * delay, 30.0)
        proc.join()
        log.info("rank %d left the group (exit code %s); joining again in %.0f s", rank, proc.exitcode, delay)
        parent.close()
        time.sleep(delay)
