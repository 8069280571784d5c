"""Looking inside an EasySpec rank group from a test: each rank's KV cache as its own layers left it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from workers.easyspec import DraftRankGroup


def dump_kv(state, cache_id: int, length: int, directory: str) -> None:
    """Runs on every follower rank (DraftRankGroup.call): save its twin of the cache."""
    cache = state.caches[cache_id]
    path = Path(directory) / f"kv-{state.rank}.pt"
    torch.save({"k": cache.k[:, :, :length].clone(), "v": cache.v[:, :, :length].clone()}, path)


def fetch_kv(draft, cache, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KV [L, KV, length, D] of a LayerParallelDraftModel as the plan computed it: each
    parallel layer from the rank that owns it (ranks hold stale entries for the others)."""
    length = cache.length if length is None else length
    k, v = cache.k[:, :, :length].clone(), cache.v[:, :, :length].clone()
    group = draft.executor
    if not isinstance(group, DraftRankGroup):  # the single-process executor: rank 0 holds every layer
        return k, v
    with tempfile.TemporaryDirectory(prefix="tandem-kv-") as directory:
        group.call(f"{__name__}:dump_kv", cache.cache_id, length, directory)
        dumps = {r: torch.load(Path(directory) / f"kv-{r}.pt") for r in range(1, group.world)}
    for layers in group.plan.parallel_groups:
        for layer, rank in zip(layers, group.plan.ranks_of(layers)):
            if rank:
                k[layer], v[layer] = dumps[rank]["k"][layer], dumps[rank]["v"][layer]
    return k, v
