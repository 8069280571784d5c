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
"""

from __future__ import annotations

from typing import Callable

import torch

from configs.choices import VARIANTS, check_choice
from workers.model import KVCache, LlamaModel, Positions
from workers.model.model import TwoRowFloor

from .plan import LayerPlan

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks (in place)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def layer_delta(layer, h: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], pos: Positions) -> torch.Tensor:
    """layer(h) - h, computed as attention + MLP contributions (no cancellation): [T, dim]."""
    a = layer.attention_block(h, kv, pos)
    return a + layer.mlp_block(h + a)


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

    def exact(self, h: torch.Tensor, cache: KVCache, pos: Positions) -> torch.Tensor:
        """The ordinary layer-by-layer forward (every rank runs all of it)."""
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cache.layer(i), pos)
        return h

    def fuzzy(self, h: torch.Tensor, cache: KVCache, pos: Positions) -> torch.Tensor:
        """The layer-parallel forward; this rank writes KV of its own layers and the sequential ones."""
        layers = self.model.layers
        for group in self.plan.groups:
            if len(group) == 1:
                i = group[0]
                h = layers[i](h, cache.layer(i), pos)
                continue
            mine = self._mine(group)
            if self.variant == "full":
                delta = None
                for i in mine:
                    d = layer_delta(layers[i], h, cache.layer(i), pos)
                    delta = d if delta is None else delta + d
                delta = torch.zeros_like(h) if delta is None else delta
                h = h + self.all_reduce(delta)
            else:
                attn = None
                for i in mine:
                    a = layers[i].attention_block(h, cache.layer(i), pos)
                    attn = a if attn is None else attn + a
                attn = torch.zeros_like(h) if attn is None else attn
                h = h + self.all_reduce(attn)
                for i in group:  # replicated on every rank: no exchange
                    h = h + layers[i].mlp_block(h)
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
