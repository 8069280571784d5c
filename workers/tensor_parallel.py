"""A tensor-parallel target: the verify model's layers split over R ranks (Megatron-style).

Rank 0 is the verify worker's process: it owns the ZeroMQ sockets, runs the
verify engine and the acceptance rule, and sees `TensorParallelModel` as it
would see a LlamaModel (forward, new_cache, args). Ranks 1..R-1 are a rank
group's followers (workers/ranks/group.py, the bootstrap the layer-parallel
draft uses too): each loads its share of the weights (workers/model/tensor_split.py)
and runs every pass rank 0 announces (a `ShardForwardBatch` command: per request
cache id, start position, tokens; one command for a whole batched pass),
computing no logits. A batched pass is LlamaModel.forward_batch on every rank:
each request's rows are what they are alone, and each row-parallel linear
all-reduces all the batch's rows at once. Each layer costs two all-reduces of
[T, dim] in the model dtype (after the attention's o_proj and after the MLP's
down_proj) over the rank group's channel: shared memory on CPU ("auto"), gloo,
or NCCL on CUDA.

A failed rank takes the group down, and with `fatal` the whole process: at the
next pass, or within WATCH_INTERVAL_S while idle (the verify worker exits; the
launcher restarts it with its ranks).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from workers.model import KVCache, LlamaModel
from workers.model.dtypes import compute_dtype, dtype_name
from workers.model.model import Segment
from workers.model.tensor_split import TensorSplit, attach_all_reduce, row_parallel_layers, tensor_splits
from workers.ranks.channel import Channel, RankError, all_reduce_in_chunks
from workers.ranks.commands import NewCache, ShardForward, ShardForwardBatch, command_batches
from workers.ranks.group import RankGroup, pick_channel

log = logging.getLogger("tandem.tp")

_cache_ids = itertools.count(1)

# with `fatal`: how often an idle rank 0 checks that its followers live
WATCH_INTERVAL_S = 0.5

# all-reduce chunks over the shared-memory channel: a prefill's [T, dim] goes in pieces of this many rows
SHM_CHUNK_TOKENS = 64


class ShardKVCache(KVCache):
    """A rank's KV cache (its heads only), with an id that names its twins on the other ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache_id = next(_cache_ids)


@dataclass(frozen=True)
class TargetCheckpoint:
    """How every rank loads its share of the target (the same weights rank 0 loads)."""

    path: str
    dtype: str = "auto"  # resolved by _checkpoint for the target's device
    quantization: str = "none"

    def load(self, device, split: TensorSplit) -> LlamaModel:
        from workers.model import load_model
        from workers.model.dtypes import compute_dtype

        dtype = compute_dtype(self.dtype, device, self.quantization)
        return load_model(Path(self.path), dtype=dtype, quantization=self.quantization, device=device, split=split)

    def splits(self, world: int) -> list[TensorSplit]:
        from workers.model.loader import read_args

        return tensor_splits(read_args(Path(self.path)), world, self.quantization)


class ShardState:
    """What every rank holds: its share of the model and its twins of the engine's caches."""

    def __init__(self, model: LlamaModel, rank: int, channel: Channel, chunk_elements: int | None):
        self.model, self.rank, self.channel = model, rank, channel
        self.caches: dict[int, ShardKVCache] = {}
        attach_all_reduce(model, all_reduce_in_chunks(channel, chunk_elements))
        model.linear_invariance()  # this rank's batch invariance, before any pass (it may floor 1-row calls)

    def handle(self, command) -> None:
        """A follower's share of one command."""
        if isinstance(command, ShardForwardBatch):
            segments = []
            for part in command.passes:
                cache = self.caches[part.cache_id]
                cache.length = part.start  # a rollback on rank 0 is a shorter start here
                tokens = torch.tensor(part.tokens, dtype=torch.long, device=self.model.device)
                segments.append(Segment(tokens, cache, 0))
            self.model.forward_batch(segments)
        elif isinstance(command, NewCache):
            self.caches[command.cache_id] = self.model.new_cache(command.capacity, ShardKVCache)
        else:
            raise ValueError(f"a tensor-parallel rank got a {type(command).__name__} command")


@dataclass(frozen=True)
class ShardFollower:
    """What ranks 1..R-1 run (workers.ranks.group.FollowerProgram)."""

    checkpoint: TargetCheckpoint
    splits: tuple[TensorSplit, ...]
    chunk_elements: int | None
    name: str = "tp"

    def start(self, rank: int, channel: Channel, device: torch.device) -> ShardState:
        return ShardState(self.checkpoint.load(device, self.splits[rank]), rank, channel, self.chunk_elements)


class TensorParallelModel(RankGroup):
    """Rank 0's handle: a LlamaModel's interface over R ranks, and the rank group under it.

    placements: one per rank (placements[0] is this process, placed by its caller).
    """

    def __init__(
        self,
        checkpoint: TargetCheckpoint,
        placements: Sequence,
        device: torch.device,
        *,
        channel: str = "auto",
        timeout_s: float = 60.0,
        startup_timeout_s: float = 600.0,
        max_pass_tokens: int = 8192,
        fatal: bool = False,
        **group_options,  # RankGroup's: rendezvous (ranks on other hosts), secret, heartbeat_timeout_s
    ):
        from workers.model.loader import read_args

        self.checkpoint = checkpoint
        self.splits = tuple(checkpoint.splits(len(placements)))  # ValueError here, before anything starts
        self.fatal = fatal
        self.max_pass_tokens = max_pass_tokens
        self.device = torch.device(device)
        element = torch.finfo(compute_dtype(checkpoint.dtype, self.device, checkpoint.quantization)).bits // 8
        slot_bytes = SHM_CHUNK_TOKENS * read_args(Path(checkpoint.path)).dim * element
        # shared memory moves at most a slot at a time; gloo and NCCL take any size
        across_hosts = bool(group_options.get("rendezvous") and group_options["rendezvous"].address)
        self._chunk = slot_bytes // element if pick_channel(channel, self.device, across_hosts) == "shm" else None
        self.model: LlamaModel | None = None
        super().__init__(
            ShardFollower(checkpoint, self.splits, self._chunk),
            len(placements),
            self.device,
            placements=placements,
            channel=channel,
            slot_bytes=slot_bytes,
            max_command_tokens=max_pass_tokens,
            timeout_s=timeout_s,
            startup_timeout_s=startup_timeout_s,
            **group_options,
        )
        if fatal:
            threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def _watch(self) -> None:
        """A follower that dies while rank 0 is idle ends this process too (fatal)."""
        while not self._closed:
            dead = self.lost_ranks()
            if dead and not self._closed:
                log.critical("tensor-parallel rank(s) %s died; the worker exits", dead)
                logging.shutdown()
                os._exit(1)
            time.sleep(WATCH_INTERVAL_S)

    def _while_followers_start(self) -> None:
        self.model = self.checkpoint.load(self.device, self.splits[0])
        self.state = ShardState(self.model, 0, self.channel, self._chunk)

    # -- the model interface -------------------------------------------------

    @property
    def args(self):
        return self.model.args

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def all_reduces_per_pass(self) -> int:
        return len(row_parallel_layers(self.model))

    def new_cache(self, max_seq_len: int) -> ShardKVCache:
        cache = self.model.new_cache(max_seq_len, ShardKVCache)
        self._checked(self.send, NewCache(cache.cache_id, max_seq_len))
        return cache

    @torch.inference_mode()
    def forward_batch(self, segments) -> list[torch.Tensor]:
        """LlamaModel.forward_batch's contract (workers.model.model.Segment each): one pass over
        all the segments on every rank, announced by one command (more only when the tokens
        overflow a command); each segment gets bit for bit what `forward` gives it alone."""
        segments = [Segment(s.tokens.reshape(-1), s.cache, s.num_logits) for s in segments]
        if len({id(s.cache) for s in segments}) != len(segments):
            raise ValueError("forward_batch: one segment per cache")
        for s in segments:  # checked before anything is sent: a refused pass leaves the ranks in step
            T = s.tokens.shape[0]
            if not 1 <= T <= self.max_pass_tokens:
                raise ValueError(f"a pass of {T} tokens: must be 1..{self.max_pass_tokens}")
            if s.cache.length + T > s.cache.capacity:
                raise ValueError(f"KV cache overflow: {s.cache.length} + {T} tokens > capacity {s.cache.capacity}")
            if not 0 <= s.num_logits <= T:
                raise ValueError(f"num_logits must be in [0, {T}], got {s.num_logits}")

        def go(part: list[Segment]):
            self.send(ShardForwardBatch([ShardForward(s.cache.cache_id, s.cache.length, s.tokens.tolist()) for s in part]))
            return self.model.forward_batch(part)

        out: list[torch.Tensor] = []
        for indices in command_batches([s.tokens.shape[0] for s in segments], self.max_pass_tokens):
            out += self._checked(go, [segments[i] for i in indices])
        return out

    def forward(self, tokens: torch.Tensor, cache: ShardKVCache, num_logits: int = 1) -> torch.Tensor:
        """tokens: [T] ids at positions cache.length.. -> logits [num_logits, vocab] float32, as LlamaModel."""
        return self.forward_batch([Segment(tokens, cache, num_logits)])[0]

    def _checked(self, fn, *args):
        try:
            return self._call(fn, *args)
        except RankError as e:
            if self.fatal:
                log.critical("a tensor-parallel rank failed; the worker exits: %s", e)
                raise SystemExit(f"tensor-parallel target: {e}") from e
            raise


def _checkpoint(config) -> TargetCheckpoint:
    from workers.model import resolve_checkpoint

    path = resolve_checkpoint(config.target.path, progress=log.info)
    dtype = dtype_name(compute_dtype(config.target.dtype, config.placement_of_mode.target.device, config.target.quantization))
    return TargetCheckpoint(str(path), dtype, config.target.quantization)


def external_rank(config, rank: int):
    """What `tandem worker --role verify-rank --rank N` runs: (program, placement,
    rendezvous), built from the config as rank 0 builds them (workers.ranks.run_external_rank)."""
    from workers.ranks.group import external_rank_setup

    placements = config.placement_of_mode.targets
    checkpoint = _checkpoint(config)
    program = ShardFollower(checkpoint, tuple(checkpoint.splits(len(placements))), None)
    return external_rank_setup(program, placements, rank, config.tensor_parallel, config)


def target_model(config, device: torch.device):
    """The verify worker's target (config: a configs.loader.Config) and its resolved
    checkpoint directory: a LlamaModel on one device; on several (`placement.<mode>.target`
    a list) a TensorParallelModel whose failure ends the worker."""
    from workers.shell import load_worker_model

    placements = config.placement_of_mode.targets
    if len(placements) == 1:
        return load_worker_model(config.target, device)
    from workers.ranks.rendezvous import deployment_secret

    checkpoint = _checkpoint(config)
    model = TensorParallelModel(
        checkpoint,
        placements,
        device,
        channel=config.tensor_parallel.channel,
        timeout_s=config.tensor_parallel.timeout_s,
        startup_timeout_s=config.server.startup_timeout_s,
        max_pass_tokens=config.scheduler.max_model_len,
        fatal=True,
        rendezvous=config.tensor_parallel.rendezvous,
        secret=deployment_secret(config.curve),
        heartbeat_timeout_s=config.server.heartbeat_timeout_s,
    )
    return model, Path(checkpoint.path)
