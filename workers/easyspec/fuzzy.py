"""The math of EasySpec's layer-parallel ("fuzzy") draft forward, one rank's share of it.

For a parallel group G = [i, j, ...] with group input h ([T, dim]):

- variant "full": every layer of G reads the same h. Layer l's residual
  contribution is delta_l = layer_l(h) - h = a_l + m_l with a_l = attn_l(h) and
  m_l = mlp_l(h + a_l); the group output is h + sum_l delta_l.
- variant "attention": only the attentions read the same h:
  h' = h + sum_l attn_l(h), then the MLPs run in order: h' = h' + mlp_l(h') for l in G.

Each layer writes its own KV entries from its (approximate) input: they are
fuzzy until calibration (an exact, layer-by-layer forward) overwrites them.

`LayerRunner` runs one rank's share: the layers the plan gives it in parallel
groups, every sequential layer (replicated: no exchange), and an `all_reduce`
that sums the partial contributions over the ranks. With `rank=None` it
computes every layer of every group in this process: the single-process
reference, whose all_reduce is the identity.

A pass is ragged (`Ragged`): the rows of one or more requests, each over its own
cache at its own positions, laid one after another as LlamaModel.forward_batch
lays them (attention per request, linears over all rows where batch-invariant),
so a request gets bit for bit what it gets in a pass of its own, and a parallel
group costs one all-reduce for the whole batch.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from configs.choices import VARIANTS, check_choice
from workers.model import KVCache, LlamaModel, Positions
from workers.model.model import RaggedRows, TwoRowFloor

from .plan import LayerPlan

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks (in place)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


class Ragged(NamedTuple):
    """The segments of one pass: each request's caches and positions, and the rows they fill."""

    caches: list[KVCache]
    positions: list[Positions]
    rows: RaggedRows

    @classmethod
    def of(cls, model: LlamaModel, caches: Sequence[KVCache], starts: Sequence[int], lengths: Sequence[int]) -> "Ragged":
        positions, rows = model.ragged_rows(starts, lengths)
        return cls(list(caches), positions, rows)

    def kv(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [cache.layer(layer) for cache in self.caches]

    def layer(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        return layer.forward_ragged(h, self.kv(i), self.positions, self.rows)

    def attention(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        return layer.attention_ragged(h, self.kv(i), self.positions, self.rows)

    def mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        return layer.mlp_ragged(h, self.rows)


class Single(NamedTuple):
    """A pass of one request: the plain layer calls (what Ragged gives a lone request, bit for
    bit, without its bookkeeping: a lone draft step pays nothing for batching)."""

    cache: KVCache
    pos: Positions

    def layer(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        return layer(h, self.cache.layer(i), self.pos)

    def attention(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        return layer.attention_block(h, self.cache.layer(i), self.pos)

    def mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        return layer.mlp_block(h)


class Job(NamedTuple):
    """One request's part of a draft pass: tokens [T] at positions start.. over its cache,
    layer by layer (exact) or by the plan's parallel groups (fuzzy); logits of the last
    num_logits; the cache's length after the pass."""

    cache: KVCache
    start: int
    tokens: torch.Tensor
    num_logits: int
    exact: bool
    final_length: int


def hidden_rows(model: LlamaModel, runner: "LayerRunner", jobs: Sequence[Job]) -> list[torch.Tensor]:
    """This rank's layers for every job: the exact jobs in one ragged pass, then the fuzzy
    ones in another (one all-reduce per parallel group for all of them). Returns each job's
    last num_logits hidden rows [num_logits, dim] (before the final norm)."""
    out: list[torch.Tensor] = [None] * len(jobs)  # type: ignore[list-item]
    for exact in (True, False):
        picked = [i for i, job in enumerate(jobs) if job.exact == exact]
        if not picked:
            continue
        part = [jobs[i] for i in picked]
        lengths = [j.tokens.shape[0] for j in part]
        if len(part) == 1:
            batch: Ragged | Single = Single(part[0].cache, model.positions(part[0].start, lengths[0]))
        else:
            batch = Ragged.of(model, [j.cache for j in part], [j.start for j in part], lengths)
        h = model.embed(part[0].tokens if len(part) == 1 else torch.cat([j.tokens for j in part]))  # [N, dim]
        h = runner.exact(h, batch) if exact else runner.fuzzy(h, batch)
        for i, end in zip(picked, torch.tensor(lengths).cumsum(0).tolist()):
            out[i] = h[end - jobs[i].num_logits : end]
    return out


def stacked(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]], list[int]]:
    """Row blocks one after another: (all rows, each block's bounds, each block's row count),
    as ragged_head / LlamaModel.head_batch take them."""
    counts = [r.shape[0] for r in rows]
    ends = torch.tensor(counts).cumsum(0).tolist()
    return torch.cat(list(rows)), [(end - n, end) for n, end in zip(counts, ends)], counts


def layer_delta(layer, i: int, h: torch.Tensor, batch: "Ragged | Single") -> torch.Tensor:
    """layer(h) - h, computed as attention + MLP contributions (no cancellation): [N, dim]."""
    a = batch.attention(layer, i, h)
    return a + batch.mlp(layer, h + a)


class LayerRunner:
    """Runs the decoder layers of one rank for a layer plan (see the module docstring)."""

    def __init__(
        self,
        model: LlamaModel,
        plan: LayerPlan,
        variant: str = "full",
        *,
        rank: int | None = None,
        all_reduce: AllReduce = _identity,
    ):
        if plan.num_layers != model.args.n_layers:
            raise ValueError(f"layer plan covers {plan.num_layers} layers, the draft has {model.args.n_layers}")
        check_choice("EasySpec variant", variant, VARIANTS)
        if rank is not None and not 0 <= rank < plan.num_devices:
            raise ValueError(f"rank {rank} outside [0, {plan.num_devices})")
        self.model = model
        self.plan = plan
        self.variant = variant
        self.rank = rank
        self.all_reduce = all_reduce

    def _mine(self, group: tuple[int, ...]) -> tuple[int, ...]:
        return group if self.rank is None else self.plan.layers_of_rank(group, self.rank)

    def exact(self, h: torch.Tensor, batch: "Ragged | Single") -> torch.Tensor:
        """The ordinary layer-by-layer forward (every rank runs all of it). h: [N, dim]."""
        for i, layer in enumerate(self.model.layers):
            h = batch.layer(layer, i, h)
        return h

    def fuzzy(self, h: torch.Tensor, batch: "Ragged | Single") -> torch.Tensor:
        """The layer-parallel forward; this rank writes KV of its own layers and the sequential ones."""
        layers = self.model.layers
        for group in self.plan.groups:
            if len(group) == 1:
                i = group[0]
                h = batch.layer(layers[i], i, h)
                continue
            mine = self._mine(group)
            if self.variant == "full":
                delta = None
                for i in mine:
                    d = layer_delta(layers[i], i, h, batch)
                    delta = d if delta is None else delta + d
                delta = torch.zeros_like(h) if delta is None else delta
                h = h + self.all_reduce(delta)
            else:
                attn = None
                for i in mine:
                    a = batch.attention(layers[i], i, h)
                    attn = a if attn is None else attn + a
                attn = torch.zeros_like(h) if attn is None else attn
                h = h + self.all_reduce(attn)
                for i in group:  # replicated on every rank: no exchange
                    h = h + batch.mlp(layers[i], h)
        return h


def head_quantization_of(model: LlamaModel) -> str:
    """The quantization of the model's output head ("none", "int8" or "int4")."""
    head = model.output.inner if isinstance(model.output, TwoRowFloor) else model.output
    name = type(head).__name__
    return {"Int8Linear": "int8", "Int4Linear": "int4"}.get(name, "none")


def vocab_bounds(vocab_size: int, world: int, align: int = 64) -> list[tuple[int, int]]:
    """Split [0, vocab_size) into `world` contiguous shards, boundaries aligned to `align`."""
    cuts = [0]
    for r in range(1, world):
        cuts.append(min(vocab_size, round(vocab_size * r / world / align) * align))
    cuts.append(vocab_size)
    return [(cuts[r], cuts[r + 1]) for r in range(world)]
