"""The C attention kernel for passes of up to ROW_WISE_MAX_T rows (workers/model/attend.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from workers.model import attend, qlinear
from workers.model.model import ROW_WISE_MAX_T
from workers.model.qlinear import machine_can_build, machine_variants

pytestmark = pytest.mark.skipif(machine_can_build() is not None, reason=f"qgemm: {machine_can_build()}")


@pytest.fixture(autouse=True, params=machine_variants())
def variant(request, monkeypatch):
    """Every variant of the kernel this CPU runs (an AVX512 machine tests its AVX2 build too)."""
    monkeypatch.setattr(attend, "kernel", lambda: qlinear.kernel(request.param))
    return request.param

SHAPES = [(2, 6, 128, 200, 1), (2, 6, 128, 200, 5), (3, 3, 64, 37, ROW_WISE_MAX_T), (1, 1, 16, 0, 1), (2, 2, 32, 0, 3)]


def _inputs(KV, G, D, T, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(KV, 256, D, generator=g).to(dtype) for _ in range(2))
    return torch.randn(T, KV * G, D, generator=g).to(dtype), k, v


def _sdpa_rows(q, k, v, start, scale):
    T, H, D = q.shape
    KV = k.shape[0]
    return torch.cat([
        F.scaled_dot_product_attention(q[t].double().view(1, KV, H // KV, D), k[None, :, : start + t + 1].double(),
                                       v[None, :, : start + t + 1].double(), scale=scale).view(1, H * D)
        for t in range(T)
    ])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("KV, G, D, start, T", SHAPES)
def test_attend_rows_is_causal_attention(KV, G, D, start, T, dtype):
    """Catches a wrong causal span (row t must see keys [0, start + t]), a wrong head grouping
    (query head h*G+g reads kv head h), a bad softmax or exp, a bf16 cache widened wrongly:
    against SDPA in float64 on the same (rounded) inputs."""
    q, k, v = _inputs(KV, G, D, T, dtype)
    got = attend.attend_rows(q, k, v, start, D**-0.5)
    torch.testing.assert_close(got.double(), _sdpa_rows(q, k, v, start, D**-0.5), rtol=0, atol=2e-6)


@pytest.mark.parametrize("KV, G, D, start, T", SHAPES)
def test_attend_rows_is_batch_invariant_and_thread_invariant(KV, G, D, start, T):
    """Catches a kernel whose row depends on the other rows of the pass or on the thread count:
    a verification's rows must equal the decode steps' bit for bit (greedy sd == ar)."""
    q, k, v = _inputs(KV, G, D, T, torch.bfloat16, seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = attend.attend_rows(q, k, v, start, 0.1)
        torch.set_num_threads(1)
        alone = torch.cat([attend.attend_rows(q[t : t + 1], k, v, start + t, 0.1) for t in range(T)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


def test_model_attention_takes_the_kernel_for_short_passes(monkeypatch):
    """Catches the fast path wired off (usable() false for an ordinary CPU cache) or taken for a
    prefill longer than ROW_WISE_MAX_T (which needs the masked pass)."""
    from workers.model import LlamaModel
    from workers.model.args import ModelArgs

    args = ModelArgs(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=64)
    model = LlamaModel(args, torch.float32)
    calls = []
    real = attend.attend_rows
    monkeypatch.setattr(attend, "attend_rows", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    cache = model.new_cache(32)
    with torch.inference_mode():
        model.forward(torch.arange(12), cache)
        model.forward(torch.arange(3), cache)
    assert calls == [3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_rows_writes_the_new_keys_and_values_it_is_given(dtype):
    """new_kv (views of a wider projection, float32 for a bf16 cache): the kernel writes them at
    start, and the rows and the caches equal those of writing them first with torch. Catches a
    key at the wrong position or head, the value's row stride taken for the key's, a missing
    rounding to the cache's dtype."""
    KV, G, D, T, start, S = 2, 3, 32, 4, 9, 24
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(KV, S, D, generator=g).to(dtype) for _ in range(2))
    qkv = torch.randn(T, (KV * G + 2 * KV) * D, generator=g)
    q = qkv[:, : KV * G * D].view(T, KV * G, D)
    k_new = qkv[:, KV * G * D : (KV * G + KV) * D].view(T, KV, D)
    v_new = qkv[:, (KV * G + KV) * D :].view(T, KV, D)
    k_want, v_want = k.clone(), v.clone()
    k_want[:, start : start + T] = k_new.transpose(0, 1).to(dtype)
    v_want[:, start : start + T] = v_new.transpose(0, 1).to(dtype)
    want = attend.attend_rows(q, k_want, v_want, start, 0.3)
    got = attend.attend_rows(q, k, v, start, 0.3, new_kv=(k_new, v_new))
    assert torch.equal(k, k_want) and torch.equal(v, v_want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attend_segments_gives_each_segment_what_attend_rows_gives_it_alone(dtype):
    """One call for a batched pass's segments (different cache capacities, starts and row
    counts, an empty one): each segment's new keys and values land at its start in its own
    cache, and its rows equal attend_rows' for it alone bit for bit. Catches a row read from
    another segment's cache or position, a key written at the wrong place, a wrong stride."""
    KV, G, D = 2, 3, 32
    g = torch.Generator().manual_seed(2)
    lengths, starts, capacities = [1, 5, 0, 3, ROW_WISE_MAX_T], [7, 0, 4, 40, 19], [16, 64, 8, 48, 32]
    caches = [tuple(torch.randn(KV, S, D, generator=g).to(dtype) for _ in range(2)) for S in capacities]
    alone = [(k.clone(), v.clone()) for k, v in caches]
    N = sum(lengths)
    qk = torch.randn(N, KV * G + KV, D, generator=g).to(dtype)
    v_new = torch.randn(N, KV, D, generator=g).to(dtype)
    got = attend.attend_segments(qk, v_new, caches, torch.tensor(starts, dtype=torch.int32),
                                 torch.tensor(lengths, dtype=torch.int32), 0.2)
    want, row = [], 0
    for (k, v), start, T in zip(alone, starts, lengths):
        k[:, start : start + T] = qk[row : row + T, KV * G :].transpose(0, 1)
        v[:, start : start + T] = v_new[row : row + T].transpose(0, 1)
        if T:
            want.append(attend.attend_rows(qk[row : row + T, : KV * G], k, v, start, 0.2))
        row += T
    assert torch.equal(got, torch.cat(want))
    for (k, v), (k_alone, v_alone) in zip(caches, alone):
        assert torch.equal(k, k_alone) and torch.equal(v, v_alone)
