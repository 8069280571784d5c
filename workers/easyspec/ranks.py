"""Layer-group ranks: the draft runs on D processes, one per device.

Rank 0 lives in the caller's process (the draft worker, or a test); it owns the
engine-facing model and sends every other rank a command per pass (commands.py).
Ranks 1..D-1 are spawned here, load the same draft weights, and follow.

A fuzzy pass exchanges one all-reduce per parallel group; sequential layers and
exact (calibration) passes run replicated on every rank, so every rank's cache
holds what its own layers need, and exact passes need no exchange at all. With
`split_head`, each rank computes the logits of a slice of the vocabulary and
rank 0 gathers them (one more exchange per pass, the head being the biggest
single matrix of a small draft).

Failures: a follower that dies or raises is noticed by rank 0 at its next
exchange (process liveness checks while waiting, and a timeout), which raises
RankError; the group is then down (`healthy` is False) and every later call
raises at once. Followers exit when rank 0 goes away.
"""

from __future__ import annotations

import atexit
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
from pathlib import Path
from typing import Sequence

import torch

from configs.choices import CHANNELS, VARIANTS, check_choice
from workers.model import LlamaModel
from workers.shell import apply_placement, die_with_parent, name_process

from .cache import DraftKVCache
from .commands import Barrier, Call, Configure, Forward, NewCache, Shutdown, max_words, pack, unpack
from .channel import (
    Channel,
    DistChannel,
    DistRendezvous,
    RankError,
    RankExit,
    ShmChannel,
    ShmLayout,
    shm_directory,
    unlink_quietly,
)
from .fuzzy import LayerRunner, head_quantization_of, vocab_bounds
from .plan import LayerPlan, validate_groups

log = logging.getLogger("tandem.easyspec")


@dataclass(frozen=True)
class DraftCheckpoint:
    """How every rank loads the draft (the same weights rank 0 was loaded with)."""

    path: str
    dtype: str = "bfloat16"
    quantization: str = "none"

    def load(self, device) -> LlamaModel:
        from workers.model import load_model

        return load_model(Path(self.path), dtype=getattr(torch, self.dtype), quantization=self.quantization, device=device)


@dataclass(frozen=True)
class RankPlacement:
    """Where a rank runs; the same fields as configs' DevicePlacement (either works)."""

    device: str = "cpu"
    cores: tuple[int, ...] = ()
    threads: int = 0


def configure_command(plan: LayerPlan, variant: str, split_head: bool) -> Configure:
    return Configure([len(g) for g in plan.groups], variant, split_head)


def plan_of_command(command: Configure, num_layers: int, num_devices: int) -> LayerPlan:
    groups, start = [], 0
    for width in command.group_widths:
        groups.append(list(range(start, start + width)))
        start += width
    return validate_groups(groups, num_layers, num_devices)


class HeadShard:
    """This rank's slice of the output head: logits for vocab [lo, hi), padded to a common width."""

    def __init__(self, model: LlamaModel, checkpoint: DraftCheckpoint, rank: int, world: int):
        from workers.model.linear import make_linear

        V = model.args.vocab_size
        self.bounds = vocab_bounds(V, world)
        self.width = max(hi - lo for lo, hi in self.bounds)
        lo, hi = self.bounds[rank]
        weight = self._head_weight(model, checkpoint)[lo:hi]
        self.linear = make_linear(weight, None, head_quantization_of(model), model.dtype, model.device)
        self.pad = self.width - (hi - lo)
        self.model = model

    @staticmethod
    def _head_weight(model: LlamaModel, checkpoint: DraftCheckpoint) -> torch.Tensor:
        from workers.model.loader import open_weights

        if model.args.tie_embeddings:
            return model.tok_embeddings.weight.detach()
        weights = open_weights(Path(checkpoint.path))  # safetensors, or a GGUF file served as is
        if "lm_head.weight" in weights:
            return weights.get("lm_head.weight")
        return model.tok_embeddings.weight.detach()  # no separate head tensor: tied in fact

    def __call__(self, h: torch.Tensor, num_logits: int) -> torch.Tensor:  # -> [num_logits, width] f32
        out = self.linear(self.model.norm(h[-num_logits:])).float()
        if self.pad:
            out = torch.nn.functional.pad(out, (0, self.pad))
        return out

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p[:, : hi - lo] for p, (lo, hi) in zip(parts, self.bounds)], dim=1)


class RankState:
    """What every rank holds: the model, its runner for the current plan, KV cache twins."""

    def __init__(self, model: LlamaModel, checkpoint: DraftCheckpoint, rank: int, channel: Channel):
        self.model = model
        self.checkpoint = checkpoint
        self.rank = rank
        self.channel = channel
        self.caches: dict[int, DraftKVCache] = {}
        self.runner: LayerRunner | None = None
        self.head: HeadShard | None = None
        self.split_head = False

    def configure(self, plan: LayerPlan, variant: str, split_head: bool) -> None:
        self.runner = LayerRunner(self.model, plan, variant, rank=self.rank, all_reduce=self.channel.all_reduce_)
        self.split_head = split_head
        if split_head and self.head is None:
            self.head = HeadShard(self.model, self.checkpoint, self.rank, self.channel.world)

    def forward(
        self,
        cache: DraftKVCache,
        start: int,
        tokens: torch.Tensor,
        num_logits: int,
        exact: bool,
        split_head: bool,
    ) -> torch.Tensor | None:
        """This rank's share of one pass; rank 0 gets the logits [num_logits, V] float32."""
        model = self.model
        pos = model.positions(start, tokens.shape[0])
        h = model.embed(tokens)
        h = self.runner.exact(h, cache, pos) if exact else self.runner.fuzzy(h, cache, pos)
        if split_head:
            parts = self.channel.gather(self.head(h, num_logits))
            return None if parts is None else self.head.assemble(parts)
        return model.head(h, num_logits) if self.rank == 0 else None


# -- followers -----------------------------------------------------------------


def _follower_main(rank: int, world: int, checkpoint: DraftCheckpoint, placement, channel_setup, doorbells, conn):
    """Entry point of ranks 1..D-1 (spawned)."""
    die_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    root_pid = channel_setup.root_pid if isinstance(channel_setup, ShmLayout) else None
    try:
        name_process(f"tandem-es{rank}")
        device = apply_placement(placement)

        def check_root():
            if os.getppid() != (root_pid or os.getppid()):
                raise RankExit("rank 0 is gone")

        if isinstance(channel_setup, ShmLayout):
            channel = ShmChannel(channel_setup, rank, doorbells, check_peers=check_root)
        else:
            channel = DistChannel(channel_setup, rank, device)
        model = checkpoint.load(device)
        state = RankState(model, checkpoint, rank, channel)
        conn.send(("ready", os.getpid()))
        with torch.inference_mode():
            _follow(state)
        channel.close()
        conn.send(("bye", os.getpid()))
    except RankExit:
        pass
    except BaseException:  # noqa: BLE001 - reported to rank 0, then exit non-zero
        try:
            conn.send(("error", traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)


def _follow(state: RankState) -> None:
    channel, model = state.channel, state.model
    args = model.args
    while True:
        command = unpack(channel.recv_command())
        if isinstance(command, Forward):
            cache = state.caches[command.cache_id]
            tokens = torch.tensor(command.tokens, dtype=torch.long, device=model.device)
            state.forward(cache, command.start, tokens, command.num_logits, command.exact, command.split_head)
            cache.length = command.final_length
        elif isinstance(command, NewCache):
            state.caches[command.cache_id] = model.new_cache(command.capacity, DraftKVCache)
        elif isinstance(command, Configure):
            plan = plan_of_command(command, args.n_layers, channel.world)
            state.configure(plan, command.variant, command.split_head)
        elif isinstance(command, Call):
            module, _, name = command.function.partition(":")
            getattr(importlib.import_module(module), name)(state, *command.args)
            channel.barrier()
        elif isinstance(command, Barrier):
            channel.barrier()
        elif isinstance(command, Shutdown):
            return


# -- rank 0 --------------------------------------------------------------------


def _pick_channel(kind: str, device: torch.device) -> str:
    check_choice("EasySpec channel", kind, CHANNELS)
    if kind == "auto":
        return "nccl" if device.type == "cuda" else "shm"
    if kind == "shm" and device.type != "cpu":
        raise ValueError("the shared-memory channel exchanges CPU tensors; use gloo or nccl for GPU ranks")
    return kind


class RankGroup:
    """Rank 0's handle on the D ranks: spawn, command, check, shut down.

    Every method raises RankError once a rank has failed; `healthy` says so without raising.
    """

    def __init__(
        self,
        model: LlamaModel,
        checkpoint: DraftCheckpoint,
        plan: LayerPlan,
        *,
        variant: str = "full",
        split_head: bool = True,
        placements: Sequence = (),
        channel: str = "auto",
        timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        max_fuzzy_tokens: int = 64,
        max_head_rows: int = 4,
        max_command_tokens: int = 8192,
    ):
        world = plan.num_devices
        if world < 2:
            raise ValueError("a rank group needs at least 2 devices (use the single-process draft for 1)")
        placements = list(placements) or [RankPlacement()] * world
        if len(placements) != world:
            raise ValueError(f"{len(placements)} rank placements for a plan over {world} devices")
        self.model = model
        self.checkpoint = checkpoint
        self.world = world
        self.timeout_s = timeout_s
        self.max_fuzzy_tokens = max_fuzzy_tokens
        self.max_head_rows = max_head_rows
        self.max_command_tokens = max_command_tokens
        self._failure: str | None = None
        self._closed = False
        self._procs: list = []
        self._conns: list = []
        self._rendezvous_dir = tempfile.mkdtemp(prefix="tandem-easyspec-")
        self.channel_kind = _pick_channel(channel, model.device)
        ctx = multiprocessing.get_context("spawn")
        channel_setup = self._channel_setup()
        doorbells = [ctx.Semaphore(0) for _ in range(world - 1)] if isinstance(channel_setup, ShmLayout) else []
        self._shm_path = channel_setup.path if isinstance(channel_setup, ShmLayout) else None

        atexit.register(self.close)
        try:
            if isinstance(channel_setup, ShmLayout):  # rank 0 creates the file the others attach to
                self.channel: Channel = ShmChannel(channel_setup, 0, doorbells, check_peers=self._check_peers)
            for rank in range(1, world):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_follower_main,
                    args=(rank, world, checkpoint, placements[rank], channel_setup, doorbells, child),
                    name=f"tandem-easyspec-rank{rank}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            if not isinstance(channel_setup, ShmLayout):
                self.channel = DistChannel(channel_setup, 0, model.device)
            self._await_ready(startup_timeout_s)
            if self._shm_path:  # everyone has it mapped: no file left behind, whatever happens next
                unlink_quietly(self._shm_path)
            self.state = RankState(model, checkpoint, 0, self.channel)
            self.configure(plan, variant, split_head)
        except BaseException:
            self.close()
            raise

    def _channel_setup(self) -> ShmLayout | DistRendezvous:
        """What every rank needs to open the channel of kind self.channel_kind."""
        model, world = self.model, self.world
        if self.channel_kind == "shm":
            # hidden states of a fuzzy pass, or a gathered logits slice, whichever is bigger
            hidden = self.max_fuzzy_tokens * model.args.dim * torch.finfo(model.dtype).bits // 8
            logits = self.max_head_rows * (-(-model.args.vocab_size // world) + 64) * 4
            slot = -(-max(hidden, logits, 64) // 4096) * 4096
            path = os.path.join(shm_directory(), f"tandem-easyspec-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            return ShmLayout(path, world, slot, max_words(self.max_command_tokens), self.timeout_s, os.getpid())
        init = f"file://{os.path.join(self._rendezvous_dir, 'rendezvous')}"
        return DistRendezvous(init, world, "nccl" if self.channel_kind == "nccl" else "gloo", self.timeout_s)

    # -- lifecycle -----------------------------------------------------------

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
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
        """Raise RankError if a follower died or reported an error."""
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns), start=1):
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

    @property
    def pids(self) -> list[int]:
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
        except RankError as e:
            self._failure = str(e)
            raise
        except BaseException as e:
            # a follower crashing mid-exchange can surface here as another error; blame it if so
            try:
                self._check_peers()
            except RankError as dead:
                self._failure = str(dead)
                raise dead from e
            self._failure = f"rank 0 failed during a command: {e!r}"
            raise

    def ping(self) -> float:
        """A round trip through every rank; returns seconds (raises RankError on a dead rank)."""

        def go():
            t0 = time.perf_counter()
            self.channel.send_command(pack(Barrier()))
            self.channel.barrier()
            return time.perf_counter() - t0

        return self._call(go)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the followers (politely, then by force) and free the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        channel = getattr(self, "channel", None)
        if channel is not None and self._failure is None and all(p.is_alive() for p in self._procs):
            try:
                channel.send_command(pack(Shutdown()))
            except Exception:  # noqa: BLE001
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                log.warning("EasySpec rank %s (pid %s) did not stop; terminating it", proc.name, proc.pid)
                proc.terminate()
                proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)
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

    # -- commands ------------------------------------------------------------

    def configure(self, plan: LayerPlan, variant: str, split_head: bool) -> None:
        if plan.num_devices != self.world:
            raise ValueError(f"a plan over {plan.num_devices} devices for a group of {self.world} ranks")
        if plan.num_layers != self.model.args.n_layers:
            raise ValueError(f"layer plan covers {plan.num_layers} layers, the draft has {self.model.args.n_layers}")
        check_choice("EasySpec variant", variant, VARIANTS)

        def go():
            self.channel.send_command(pack(configure_command(plan, variant, split_head)))
            self.state.configure(plan, variant, split_head)

        self._call(go)
        self.plan, self.variant, self.split_head = plan, variant, split_head

    def new_cache(self, max_seq_len: int) -> DraftKVCache:
        cache = self.model.new_cache(max_seq_len, DraftKVCache)
        self._call(self.channel.send_command, pack(NewCache(cache.cache_id, max_seq_len)))
        return cache

    def forward(
        self, cache: DraftKVCache, start: int, tokens: torch.Tensor, num_logits: int, exact: bool, final_length: int
    ) -> torch.Tensor:
        T = tokens.shape[0]
        if T > self.max_command_tokens:
            raise ValueError(f"a pass of {T} tokens exceeds the group's {self.max_command_tokens}")
        if not exact and T > self.max_fuzzy_tokens:
            raise ValueError(f"a fuzzy pass of {T} tokens exceeds the group's {self.max_fuzzy_tokens}")
        split_head = self.split_head and num_logits <= self.max_head_rows

        def go():
            command = Forward(cache.cache_id, start, tokens.tolist(), num_logits, exact, final_length, split_head)
            self.channel.send_command(pack(command))
            return self.state.forward(cache, start, tokens, num_logits, exact, split_head)

        return self._call(go)

    def call(self, function: str, *args: int | str) -> None:
        """Run function(rank_state, *args) on every follower ("module:name"; for
        looking inside the ranks: tests, debugging) and wait until all have."""

        def go():
            self.channel.send_command(pack(Call(function, list(args))))
            self.channel.barrier()

        self._call(go)

    @property
    def stats(self):
        return self.channel.stats
