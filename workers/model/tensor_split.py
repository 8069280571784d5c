"""How a tensor-parallel target splits its layers over R ranks (Megatron-style), and its weights.

Every layer is split the same way:

- column-parallel (output features split): q/k/v by KV heads (a rank's KV heads and
  their G query heads), gate/up by intermediate features;
- row-parallel (input features split): o_proj by the same heads, down_proj by the
  same features; each rank's output is a partial sum, and one all-reduce after the
  attention and one after the MLP (`AllReduced`) give every rank the whole result;
- the KV cache is split by KV heads (each rank holds its heads);
- the embedding, the norms and the output head are replicated (only rank 0
  computes logits).

Splits are as even as the units allow (3 KV heads over 2 ranks: 2 and 1). A row-parallel
weight stored in blocks (int4, GGUF) must be cut on block boundaries: the MLP is split on
multiples of `FFN_ALIGN` (the K-quants' 256-weight super-blocks where the size allows),
and a head boundary that falls inside a block of o_proj is refused when that weight is
loaded (naming it). int8 is refused: its per-row scales span the whole input row.

`ShardedWeights` serves a rank its slices of the checkpoint's tensors (float, int4 or
qgemm parts) by Hugging Face name, so the loader builds a rank's model as it builds a
whole one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# The input blocks a row-parallel weight may be cut on, per quantization, best first ("gguf":
# the K-quants' 256-weight super-blocks, else the 32-weight blocks of the others).
FFN_ALIGN = {"none": (1,), "int4": (32,), "gguf": (256, 32), "gguf-q4": (256, 32)}


def split_range(total: int, world: int, align: int = 1) -> list[tuple[int, int]]:
    """[lo, hi) for each of `world` parts of range(total), as even as possible in units of
    `align` (earlier parts get the extra units)."""
    if total % align:
        raise ValueError(f"{total} is not a multiple of the block size {align}")
    units = total // align
    if units < world:
        raise ValueError(f"{units} blocks of {align} cannot be split over {world} ranks")
    bounds, lo = [], 0
    for r in range(world):
        n = units // world + (r < units % world)
        bounds.append((lo * align, (lo + n) * align))
        lo += n
    return bounds


@dataclass(frozen=True)
class TensorSplit:
    """Rank `rank` of `world`: its KV heads [kv_lo, kv_hi) and intermediate features [ffn_lo, ffn_hi)."""

    rank: int
    world: int
    kv_lo: int
    kv_hi: int
    ffn_lo: int
    ffn_hi: int
    group: int  # query heads per KV head
    head_dim: int

    @property
    def n_kv_heads(self) -> int:
        return self.kv_hi - self.kv_lo

    @property
    def hidden(self) -> int:
        return self.ffn_hi - self.ffn_lo

    @property
    def q_range(self) -> tuple[int, int]:  # rows of q_proj (= columns of o_proj)
        return self.kv_lo * self.group * self.head_dim, self.kv_hi * self.group * self.head_dim

    @property
    def kv_range(self) -> tuple[int, int]:  # rows of k_proj and v_proj
        return self.kv_lo * self.head_dim, self.kv_hi * self.head_dim

    def cut(self, hf_name: str) -> tuple[str, int, int] | None:
        """How this rank cuts a checkpoint tensor: ("rows" | "cols" | "bias", lo, hi), or None (whole).

        "bias": a row-parallel layer's bias, added once (by rank 0; zeros elsewhere)."""
        for key, how, span in (
            (".q_proj.", "rows", self.q_range),
            (".k_proj.", "rows", self.kv_range),
            (".v_proj.", "rows", self.kv_range),
            (".o_proj.", "cols", self.q_range),
            (".gate_proj.", "rows", (self.ffn_lo, self.ffn_hi)),
            (".up_proj.", "rows", (self.ffn_lo, self.ffn_hi)),
            (".down_proj.", "cols", (self.ffn_lo, self.ffn_hi)),
        ):
            if key in hf_name:
                if how == "cols" and hf_name.endswith(".bias"):
                    return ("bias", 0, 0)
                return (how, *span)
        return None


def tensor_splits(args, world: int, quantization: str = "none") -> list[TensorSplit]:
    """Each rank's share of a model of shape `args` (a ModelArgs) over `world` ranks.

    Raises ValueError (with the reason) for a model that cannot be split so."""
    if world < 1:
        raise ValueError(f"tensor parallelism needs at least 1 rank, got {world}")
    if quantization not in FFN_ALIGN:
        raise ValueError(
            f"a tensor-parallel target cannot be quantized {quantization!r} "
            f"(supported: {', '.join(FFN_ALIGN)}; int8's per-row scales span the whole input row)"
        )
    if args.n_kv_heads < world:
        raise ValueError(f"the model's {args.n_kv_heads} KV heads cannot be split over {world} ranks")
    group = args.n_heads // args.n_kv_heads
    heads = split_range(args.n_kv_heads, world)
    if quantization == "int4":  # quantized here from float slices: their groups must be the whole model's
        cuts = [lo * group * args.head_dim for lo, _ in heads]
        if any(c % 32 for c in cuts):
            raise ValueError(f"int4 groups 32 inputs of o_proj, and the split of {args.n_kv_heads} KV heads over "
                             f"{world} ranks cuts it at {cuts}: use fewer ranks or quantization 'none'")
    ffn, reasons = None, []
    for align in FFN_ALIGN[quantization]:
        try:
            ffn = split_range(args.intermediate_size, world, align)
            break
        except ValueError as e:
            reasons.append(str(e))
    if ffn is None:
        raise ValueError(f"the MLP's {args.intermediate_size} features cannot be split over {world} ranks: {'; '.join(reasons)}")
    return [
        TensorSplit(r, world, kv[0], kv[1], f[0], f[1], group, args.head_dim) for r, (kv, f) in enumerate(zip(heads, ffn))
    ]


class ShardedWeights:
    """A checkpoint's tensors (loader._Weights or GGUFFile) as one rank sees them: sliced by `split`."""

    def __init__(self, weights, split: TensorSplit):
        self.weights, self.split = weights, split

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def _cut(self, name: str, t, rows: Callable, cols: Callable):
        cut = self.split.cut(name)
        if cut is None:
            return t
        how, lo, hi = cut
        if how == "bias":
            return t if self.split.rank == 0 else torch.zeros_like(t)
        if how == "rows" or (isinstance(t, torch.Tensor) and t.dim() == 1):
            return rows(t, lo, hi)
        try:
            return cols(t, lo, hi)
        except ValueError as e:  # a quantized weight's blocks straddle this rank's inputs
            raise ValueError(
                f"{name} cannot be split over {self.split.world} tensor-parallel ranks as stored: {e} "
                "(use fewer ranks, or quantization 'none')"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        return self._cut(name, self.weights.get(name), lambda t, lo, hi: t[lo:hi], lambda t, lo, hi: t[:, lo:hi])

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.weights.shape(name))
        cut = self.split.cut(name)
        if cut is None or cut[0] == "bias":
            return shape
        how, lo, hi = cut
        return (hi - lo, *shape[1:]) if how == "rows" or len(shape) == 1 else (shape[0], hi - lo)

    def is_int4(self, name: str) -> bool:
        return self.weights.is_int4(name)

    def is_quantized(self, name: str) -> bool:
        return self.weights.is_quantized(name)

    def int4(self, name: str):
        return self._cut(name, self.weights.int4(name), lambda p, lo, hi: p.rows(torch.arange(lo, hi)), lambda p, lo, hi: p.columns(lo, hi))

    def quant(self, name: str):
        return self._cut(name, self.weights.quant(name), lambda p, lo, hi: p.rows(torch.arange(lo, hi)), lambda p, lo, hi: p.columns(lo, hi))


class AllReduced(nn.Module):
    """A row-parallel linear: this rank's partial output, summed over the ranks in place.

    `reduce` (a channel's all-reduce) is attached once the rank group is up (attach_all_reduce)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K/R] -> [M, N], summed over the ranks
        if self.reduce is None:
            raise RuntimeError("a tensor-parallel layer has no all-reduce attached (attach_all_reduce)")
        return self.reduce(self.inner(x).contiguous())


def row_parallel_layers(model) -> list[AllReduced]:
    return [m for m in model.modules() if isinstance(m, AllReduced)]


def attach_all_reduce(model, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Give every row-parallel linear of a rank's model its all-reduce (2 per layer)."""
    for layer in row_parallel_layers(model):
        layer.reduce = reduce
