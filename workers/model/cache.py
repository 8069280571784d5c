"""Static, preallocated KV cache for one sequence (batch 1).

Rollback is a length change: entries past `length` are simply overwritten by
the next forward.
"""

from __future__ import annotations

import torch


class KVCache:
    """k, v: [n_layers, n_kv_heads, max_seq_len, head_dim]; positions [0, length) are valid."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        shape = (n_layers, n_kv_heads, max_seq_len, head_dim)
        # Ordinary tensors even when made under inference_mode, so a cache can be written both inside and outside it.
        # Not zeroed: a position is written before any pass reads it (attention reads [0, length + new)), and
        # on a CPU the pages are then mapped as the sequence grows. Zeroed, a burst of 16 new requests
        # on the default pair mapped 16 whole caches (94 MB each) in the verifier's step, and as many in
        # the draft's (sd, 16 clients x 8 tokens: time to first token p50 5.45 s, 2.79 s not zeroed).
        with torch.inference_mode(False):
            self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, KV, S, D]
            self.v = torch.empty(shape, dtype=dtype, device=device)  # [L, KV, S, D]
        self.length = 0
        self.layers = [(self.k[i], self.v[i]) for i in range(n_layers)]  # per-layer views [KV, S, D]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (k, v) of layer i, each [KV, S, D]; writes go into the cache."""
        return self.layers[i]

    def crop(self, length: int) -> None:
        """Roll back to the first `length` positions."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of length {self.length} to {length}")
        self.length = length

    def advance(self, n: int) -> None:
        """Mark n more positions valid (after every layer wrote them)."""
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {n} > capacity {self.capacity}")
        self.length += n

    def copy_prefix(self, source: "KVCache", end: int) -> None:
        """Take positions [length, end) from `source`, which holds them for the same tokens
        (prefix caching); length becomes end."""
        if not self.length <= end <= source.length or end > self.capacity:
            raise ValueError(f"cannot copy positions [{self.length}, {end}) of a cache of length {source.length}")
        self.k[:, :, self.length : end].copy_(source.k[:, :, self.length : end])
        self.v[:, :, self.length : end].copy_(source.v[:, :, self.length : end])
        self.length = end

    def reset(self) -> None:
        self.length = 0

    def __repr__(self) -> str:
        L, KV, S, D = self.k.shape
        return f"KVCache(layers={L}, kv_heads={KV}, length={self.length}/{S}, head_dim={D}, dtype={self.k.dtype})"
