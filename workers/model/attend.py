"""Attention of up to ROW_WISE_MAX_T query rows over a static KV cache by our C kernel
(kernels/attend.c, built with qgemm into one library): each (row, kv head) on its own, in one
fixed order, so a verification's rows are bit for bit the decode steps' (batch invariance).

A decode step's attention through SDPA's CPU kernel cost ~40 us a layer at 200 positions of
context (1 thread; most of it fixed cost), ours a few us; a 5-row verification called SDPA
five times. Where the kernel cannot run (no AVX512, no compiler, TANDEM_QGEMM=0, not a CPU
tensor, head_dim not a multiple of 16) `usable` says no and the caller uses SDPA row by row.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .qlinear import kernel, kernel_available

CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # dtype -> the kernel's cache_bf16 flag


@lru_cache(maxsize=1)
def _available() -> bool:
    return kernel_available()


def usable(k_cache: torch.Tensor) -> bool:
    """k_cache: one layer's [KV, S, D]."""
    D = k_cache.shape[-1]
    return (k_cache.device.type == "cpu" and k_cache.dtype in CACHE_DTYPES and D % 16 == 0 and D <= 256
            and k_cache.stride(2) == 1 and k_cache.stride(1) == D and _available())


def attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q: [T, H, D] (query rows at positions start..start+T-1, RoPE applied); k_cache, v_cache:
    [KV, S, D] with the T new entries written. Row t attends to positions [0, start + t].
    Returns [T, H * D] float32."""
    T, H, D = q.shape
    KV = k_cache.shape[0]
    rows = q.float().contiguous()
    out = torch.empty(T, H * D, dtype=torch.float32)
    rc = kernel().attend_rows(
        rows.data_ptr(), T, KV, H // KV, D, k_cache.data_ptr(), v_cache.data_ptr(), CACHE_DTYPES[k_cache.dtype],
        k_cache.stride(0), start, scale, out.data_ptr(), torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"attend_rows refused T={T}, KV={KV}, H={H}, D={D}, start={start}")
    return out
