"""Prefix caching with a tensor-parallel target over two real rank processes (tiny, float32)."""

from __future__ import annotations

import torch

from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_engine import request, run
from tests.unit.test_prefix_cache import CHUNK, SYSTEM
from workers.engine import NoDraft, VerifyEngine
from workers.model import load_model
from workers.ranks import RankPlacement
from workers.tensor_parallel import TargetCheckpoint, TensorParallelModel


def test_a_tensor_parallel_target_reuses_free_slots_exactly(tmp_path):
    """A TP-2 target (two real rank processes) reuses a free slot's prefix by a crop alone (its
    followers write where rank 0 says) and copies none between slots (they live on every
    rank): a shared prefix hits, and greedy outputs equal the single-process model's cold
    ones. Catches a copy made on rank 0 only (the followers' KV would be another request's)."""
    path = make_tiny_checkpoint(tmp_path / "tp", vocab_size=256, seed=3)
    requests = [request(i, SYSTEM + tail, max_tokens=6) for i, tail in enumerate([[1, 2], [3], [4, 5, 6]])]
    together = [request(9 + i, SYSTEM + [8, 8]) for i in range(2)]  # arrive together: no copy, both prefill
    single = load_model(path, dtype=torch.float32)
    cold = {}
    for r in requests + together:
        engine = VerifyEngine(single, NoDraft(), max_model_len=128, max_running=2, prefill_chunk=CHUNK,
                              prefix_caching=False)
        cold.update({rid: t for rid, (t, _, _) in run(engine, [r]).items()})
    placement = [RankPlacement(threads=1)] * 2
    with TensorParallelModel(TargetCheckpoint(str(path), "float32"), placement, torch.device("cpu")) as tp:
        engine = VerifyEngine(tp, NoDraft(), max_model_len=128, max_running=2, prefill_chunk=CHUNK)
        got = {}
        for r in requests:
            got.update({rid: t for rid, (t, _, _) in run(engine, [r]).items()})
        assert engine.prefix_cache_hits == 2 * CHUNK * (len(requests) - 1)
        got.update({rid: t for rid, (t, _, _) in run(engine, together).items()})
    assert got == cold
