"""Layer-group ranks: the draft runs on D processes, one per device.

Rank 0 lives in the caller's process (the draft worker, or a test); it owns the
engine-facing model and sends every other rank a command per pass
(workers/ranks/commands.py). Ranks 1..D-1 are spawned by the rank group
bootstrap (workers/ranks/group.py), load the same draft weights, and follow.

A pass takes every request drafted in a step at once (one `ForwardBatch`
command: each request's job, exact or fuzzy, over its own cache twin). Its
fuzzy jobs exchange one all-reduce per parallel group, for all of them
together; sequential layers and exact (calibration) jobs run replicated on
every rank, so every rank's cache holds what its own layers need, and exact
jobs need no exchange at all. With `split_head`, each rank computes the logits
of a slice of the vocabulary and rank 0 gathers them (one more exchange per
pass, more only when the rows overflow a slot; the head being the biggest
single matrix of a small draft).

Failures are the rank group's (RankError; see workers/ranks/group.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from configs.choices import VARIANTS, check_choice
from workers.model import LlamaModel
from workers.model.model import MAX_BATCH_ROWS, TwoRowFloor, invariant_from, ragged_head
from workers.ranks.channel import Channel, ShmChannel, all_reduce_in_chunks
from workers.ranks.commands import Configure, Forward, ForwardBatch, NewCache, command_batches
from workers.ranks.group import RankGroup, RankPlacement

from .cache import DraftKVCache
from .fuzzy import Job, LayerRunner, head_quantization_of, hidden_rows, stacked, vocab_bounds
from .plan import LayerPlan, validate_groups

__all__ = ["DraftCheckpoint", "DraftRankGroup", "RankPlacement"]  # RankPlacement: the rank group's, re-exported


@dataclass(frozen=True)
class DraftCheckpoint:
    """How every rank loads the draft (the same weights rank 0 was loaded with)."""

    path: str
    dtype: str = "auto"  # a rank started on its own (`tandem worker --role draft-rank`) resolves "auto" on its host
    quantization: str = "none"

    def load(self, device) -> LlamaModel:
        from workers.model import load_model
        from workers.model.dtypes import compute_dtype

        dtype = compute_dtype(self.dtype, device, self.quantization)
        return load_model(Path(self.path), dtype=dtype, quantization=self.quantization, device=device)


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
        probe = torch.randn(MAX_BATCH_ROWS, model.args.dim, generator=torch.Generator().manual_seed(0))
        self.head_from = invariant_from(self.linear, probe.to(model.device, model.dtype))
        if self.head_from == 2:  # as LlamaModel.linear_invariance: 1-row calls made 2-row, all rows batch
            self.linear, self.head_from = TwoRowFloor(self.linear), 1

    @staticmethod
    def _head_weight(model: LlamaModel, checkpoint: DraftCheckpoint) -> torch.Tensor:
        from workers.model.loader import open_weights

        if model.args.tie_embeddings:
            return model.tok_embeddings.weight.detach()
        weights = open_weights(Path(checkpoint.path))  # safetensors, or a GGUF file served as is
        if "lm_head.weight" in weights:
            return weights.get("lm_head.weight")
        return model.tok_embeddings.weight.detach()  # no separate head tensor: tied in fact

    def __call__(self, rows: list[torch.Tensor]) -> torch.Tensor:  # [R_i, dim] each -> [sum R_i, width] f32
        out = ragged_head(*stacked(rows), self.model.norm, self.linear, self.head_from)
        if self.pad:
            out = torch.nn.functional.pad(out, (0, self.pad))
        return out

    def assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p[:, : hi - lo] for p, (lo, hi) in zip(parts, self.bounds)], dim=1)

    def gather(self, channel: Channel, rows: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Every rank's slice of the logits of rows (one block per job), gathered on rank 0:
        logits [R_i, V] float32 per block there, None elsewhere. One gather per slot's worth."""
        logits = self(rows)  # [R, width]
        slot = channel.layout.slot_bytes if isinstance(channel, ShmChannel) else None
        step = logits.shape[0] if slot is None else max(1, slot // (self.width * logits.element_size()))
        pieces = []
        for a in range(0, logits.shape[0], step):
            parts = channel.gather(logits[a : a + step].contiguous())
            if parts is not None:
                pieces.append(self.assemble(parts))
        return list(torch.cat(pieces).split([r.shape[0] for r in rows])) if pieces else None


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
        # a batch's hidden states may outgrow a shared-memory slot: all-reduced a slot at a time
        slot = self.channel.layout.slot_bytes if isinstance(self.channel, ShmChannel) else None
        chunk = None if slot is None else slot // (torch.finfo(self.model.dtype).bits // 8)
        all_reduce = all_reduce_in_chunks(self.channel, chunk)
        self.runner = LayerRunner(self.model, plan, variant, rank=self.rank, all_reduce=all_reduce)
        self.split_head = split_head
        if split_head and self.head is None:
            self.head = HeadShard(self.model, self.checkpoint, self.rank, self.channel.world)

    def forward(self, jobs: list[Job], split: list[bool]) -> list[torch.Tensor] | None:
        """This rank's share of one pass over the jobs; rank 0 gets logits [num_logits, V]
        float32 per job (split[i]: job i's logits come from every rank's vocabulary slice)."""
        rows = hidden_rows(self.model, self.runner, jobs)
        out: list[torch.Tensor] = [None] * len(jobs)  # type: ignore[list-item]
        sliced = [i for i, s in enumerate(split) if s]
        if sliced:
            gathered = self.head.gather(self.channel, [rows[i] for i in sliced])
            for i, logits in zip(sliced, gathered or ()):
                out[i] = logits
        if self.rank != 0:
            return None
        whole = [i for i, s in enumerate(split) if not s]
        if whole:
            for i, logits in zip(whole, self.model.head_batch(*stacked([rows[i] for i in whole]))):
                out[i] = logits
        return out

    def handle(self, command) -> None:
        """A follower's share of one draft command."""
        model = self.model
        if isinstance(command, ForwardBatch):
            jobs = [
                Job(self.caches[f.cache_id], f.start, torch.tensor(f.tokens, dtype=torch.long, device=model.device),
                    f.num_logits, f.exact, f.final_length)
                for f in command.passes
            ]
            self.forward(jobs, [f.split_head for f in command.passes])
            for job in jobs:
                job.cache.length = job.final_length
        elif isinstance(command, NewCache):
            self.caches[command.cache_id] = model.new_cache(command.capacity, DraftKVCache)
        elif isinstance(command, Configure):
            plan = plan_of_command(command, model.args.n_layers, self.channel.world)
            self.configure(plan, command.variant, command.split_head)
        else:
            raise ValueError(f"a draft rank got a {type(command).__name__} command")


@dataclass(frozen=True)
class DraftFollower:
    """What ranks 1..D-1 run (workers.ranks.group.FollowerProgram): the draft's weights, whole."""

    checkpoint: DraftCheckpoint
    name: str = "es"

    def start(self, rank: int, channel: Channel, device: torch.device) -> "RankState":
        return RankState(self.checkpoint.load(device), self.checkpoint, rank, channel)


class DraftRankGroup(RankGroup):
    """Rank 0's handle on the draft's D ranks: the rank group plus the draft's commands."""

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
        **group_options,  # RankGroup's: rendezvous (ranks on other hosts), secret, heartbeat_timeout_s
    ):
        world = plan.num_devices
        self.model = model
        self.checkpoint = checkpoint
        self.max_fuzzy_tokens = max_fuzzy_tokens
        self.max_head_rows = max_head_rows
        # a slot holds the hidden states of a fuzzy pass, or a gathered logits slice, whichever is bigger
        hidden = max_fuzzy_tokens * model.args.dim * torch.finfo(model.dtype).bits // 8
        logits = max_head_rows * (-(-model.args.vocab_size // max(world, 1)) + 64) * 4
        super().__init__(
            DraftFollower(checkpoint),
            world,
            model.device,
            placements=placements,
            channel=channel,
            slot_bytes=max(hidden, logits),
            max_command_tokens=max_command_tokens,
            timeout_s=timeout_s,
            startup_timeout_s=startup_timeout_s,
            **group_options,
        )
        try:
            self.state = RankState(model, checkpoint, 0, self.channel)
            self.configure(plan, variant, split_head)
        except BaseException:
            self.close()
            raise

    # -- commands ------------------------------------------------------------

    def configure(self, plan: LayerPlan, variant: str, split_head: bool) -> None:
        if plan.num_devices != self.world:
            raise ValueError(f"a plan over {plan.num_devices} devices for a group of {self.world} ranks")
        if plan.num_layers != self.model.args.n_layers:
            raise ValueError(f"layer plan covers {plan.num_layers} layers, the draft has {self.model.args.n_layers}")
        check_choice("EasySpec variant", variant, VARIANTS)

        def go():
            self.send(configure_command(plan, variant, split_head))
            self.state.configure(plan, variant, split_head)

        self._call(go)
        self.plan, self.variant, self.split_head = plan, variant, split_head

    def new_cache(self, max_seq_len: int) -> DraftKVCache:
        cache = self.model.new_cache(max_seq_len, DraftKVCache)
        self._call(self.send, NewCache(cache.cache_id, max_seq_len))
        return cache

    def forward(self, jobs: list[Job]) -> list[torch.Tensor]:
        """One pass over the jobs on every rank: one ForwardBatch command (more only when the
        tokens overflow a command); logits [num_logits, V] float32 per job."""
        for job in jobs:
            T = job.tokens.shape[0]
            if T > self.max_command_tokens:
                raise ValueError(f"a pass of {T} tokens exceeds the group's {self.max_command_tokens}")
            if not job.exact and T > self.max_fuzzy_tokens:
                raise ValueError(f"a fuzzy pass of {T} tokens exceeds the group's {self.max_fuzzy_tokens}")
        split = [self.split_head and job.num_logits <= self.max_head_rows for job in jobs]

        def go(part: list[int]):
            self.send(ForwardBatch([
                Forward(j.cache.cache_id, j.start, j.tokens.tolist(), j.num_logits, j.exact, j.final_length, split[i])
                for i, j in ((i, jobs[i]) for i in part)
            ]))
            return self.state.forward([jobs[i] for i in part], [split[i] for i in part])

        out: list[torch.Tensor] = []
        for part in command_batches([job.tokens.shape[0] for job in jobs], self.max_command_tokens):
            out += self._call(go, part)
        return out
