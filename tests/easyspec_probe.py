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


# -- a batch of requests in every state a draft step meets ---------------------------

BATCH_PROMPTS = [[5, 17, 42, 9, 1], [200, 3, 3, 3, 9, 1, 77], [11, 12, 13], [8, 6, 4, 2, 0, 1, 3, 5, 7, 9, 250]]


def batch_states(draft) -> list:
    """Four caches of a LayerParallelDraftModel, each in another state before a draft step:
    r0 empty (the step is its exact prompt pass, 2 logits rows); r1 a prompt and two fuzzy
    drafts (the step drafts on, fuzzy); r2 three drafts then a rollback keeping one (the
    step is a calibration: exact over the kept draft and the correction); r3 a long prompt
    and one draft (fuzzy, another cache length). Returns [(cache, tokens, num_logits)]."""
    caches = [draft.new_cache(64) for _ in BATCH_PROMPTS]
    for cache, prompt in zip(caches[1:], BATCH_PROMPTS[1:]):
        draft.forward(torch.tensor(prompt), cache)
    for t in (7, 9):
        draft.forward(torch.tensor([t]), caches[1])
    for t in (21, 22, 23):
        draft.forward(torch.tensor([t]), caches[2])
    draft.after_rollback(caches[2], len(BATCH_PROMPTS[2]) + 1)
    draft.forward(torch.tensor([30]), caches[3])
    steps = [(BATCH_PROMPTS[0], 2), ([11], 1), ([99], 1), ([31], 1)]
    return [(cache, torch.tensor(tokens), n) for cache, (tokens, n) in zip(caches, steps)]
