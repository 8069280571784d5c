"""A tensor-parallel target's R shards run as threads of this process, summing through a
barrier: the math of workers/tensor_parallel.py without process start-up (fast), for
checking how weights are split (tests/unit/test_tensor_split.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from workers.model import load_model
from workers.model.loader import read_args
from workers.model.tensor_split import attach_all_reduce, tensor_splits


class ThreadAllReduce:
    """An in-place sum over `world` threads, in rank order (as the shared-memory channel sums)."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world, timeout=30)
        self.count = 0

    def for_rank(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()  # everyone has read every slot
            if rank == 0:
                self.count += 1
            return t.copy_(total)

        return reduce


def shard_models(path: Path, world: int, dtype=torch.float32, quantization: str = "none"):
    """The R rank models of checkpoint `path`, each with its thread all-reduce attached."""
    splits = tensor_splits(read_args(path), world, quantization)
    reducer = ThreadAllReduce(world)
    models = [load_model(path, dtype=dtype, quantization=quantization, split=s) for s in splits]
    for rank, model in enumerate(models):
        attach_all_reduce(model, reducer.for_rank(rank))
    return models, reducer


def run_passes(models, passes: list[tuple[torch.Tensor, int]], capacity: int = 64) -> list[torch.Tensor]:
    """Run each (tokens, num_logits) pass on every shard at once; rank 0's logits per pass."""
    caches = [m.new_cache(capacity) for m in models]
    out: list[torch.Tensor] = []
    errors: list[BaseException] = []

    def rank_main(rank: int):
        try:
            with torch.inference_mode():
                for tokens, num_logits in passes:
                    logits = models[rank].forward(tokens, caches[rank], num_logits if rank == 0 else 0)
                    if rank == 0:
                        out.append(logits)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out
