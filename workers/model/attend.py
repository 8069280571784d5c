"""Attention of up to ROW_WISE_MAX_T query rows over a static KV cache by our C kernel
(kernels/attend.c, built with qgemm into one library): each (row, kv head) on its own, in one
fixed order, so a verification's rows are bit for bit the decode steps' (batch invariance).

A decode step's attention through SDPA's CPU kernel cost ~40 us a layer at 200 positions of
context (1 thread; most of it fixed cost), ours a few us; a 5-row verification called SDPA
five times. Where the kernel cannot run (neither AVX512 nor AVX2 + FMA, no compiler,
TANDEM_QGEMM=0, not a CPU tensor, head_dim not a multiple of 16) `usable` says no and the
caller uses SDPA row by row.
"""

from __future__ import annotations

import torch

from .qlinear import kernel, kernel_ready

CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # dtype -> the kernel's cache_bf16 flag


def usable(k_cache: torch.Tensor) -> bool:
    """k_cache: one layer's [KV, S, D]."""
    D = k_cache.shape[-1]
    return (k_cache.device.type == "cpu" and k_cache.dtype in CACHE_DTYPES and D % 16 == 0 and D <= 256
            and k_cache.stride(2) == 1 and k_cache.stride(1) == D and kernel_ready())


def attend_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, scale: float,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q: [T, H, D] (query rows at positions start..start+T-1, RoPE applied); k_cache, v_cache:
    [KV, S, D]. Row t attends to positions [0, start + t]. new_kv: the T new keys and values
    ([T, KV, D] each, RoPE applied to the keys), written into the caches at start by the kernel
    (in the same call); None: the caller wrote them. Returns [T, H * D] float32."""
    T, H, D = q.shape
    KV = k_cache.shape[0]
    rows = q.float().contiguous()
    out = torch.empty(T, H * D, dtype=torch.float32)
    kn = vn = None
    if new_kv is not None:
        kn, vn = (_rows_of_heads(t, k_cache.dtype) for t in new_kv)
    rc = kernel().attend_rows(
        rows.data_ptr(), T, KV, H // KV, D, k_cache.data_ptr(), v_cache.data_ptr(), CACHE_DTYPES[k_cache.dtype],
        k_cache.stride(0), start, scale, out.data_ptr(),
        None if kn is None else kn.data_ptr(), 0 if kn is None else kn.stride(0),
        None if vn is None else vn.data_ptr(), 0 if vn is None else vn.stride(0), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"attend_rows refused T={T}, KV={KV}, H={H}, D={D}, start={start}")
    return out


def _rows_of_heads(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t: [T, KV, D] in `dtype`, each row's heads one after another (rows may be apart: a view of a
    wider tensor), as attend_rows's kernel reads new keys and values."""
    t = t.to(dtype)
    D = t.shape[-1]
    return t if t.stride(2) == 1 and t.stride(1) == D else t.contiguous()


def attend_segments(
    qk: torch.Tensor, v: torch.Tensor, caches: list, starts: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """A batched pass's attention in one kernel call: the rows of several segments, each of at
    most ROW_WISE_MAX_T rows over its own cache. qk: [N, H + KV, D] (RoPE applied, the keys
    last), v: [N, KV, D], the segments' rows one after another; caches: (k, v) of this layer
    per segment ([KV, S, D] each, `usable`); starts, lengths: int32 [segments]. Writes each
    segment's new keys and values at its start, then attends as attend_rows does for the
    segment alone (bit for bit). Returns [N, H * D] float32."""
    N, heads, D = qk.shape
    KV = v.shape[1]
    H = heads - KV
    q = qk[:, :H].float().contiguous()
    kn, vn = qk[:, H:].contiguous(), v.contiguous()
    k_ptrs = torch.tensor([k.data_ptr() for k, _ in caches], dtype=torch.int64)
    v_ptrs = torch.tensor([c.data_ptr() for _, c in caches], dtype=torch.int64)
    strides = torch.tensor([k.stride(0) for k, _ in caches], dtype=torch.int64)
    out = torch.empty(N, H * D, dtype=torch.float32)
    rc = kernel().attend_segments(
        q.data_ptr(), kn.data_ptr(), vn.data_ptr(), len(caches), lengths.data_ptr(), starts.data_ptr(),
        k_ptrs.data_ptr(), v_ptrs.data_ptr(), strides.data_ptr(), KV, H // KV, D, CACHE_DTYPES[kn.dtype], scale,
        out.data_ptr(), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"attend_segments refused {len(caches)} segments, KV={KV}, H={H}, D={D}")
    return out
