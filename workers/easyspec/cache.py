"""The draft's KV cache under EasySpec: a KVCache that knows which entries are exact.

Positions [0, exact_length) hold KV written by an exact (layer-by-layer)
forward; [exact_length, length) were written by fuzzy passes. The cache also
records the token id at every position, so a calibration pass can recompute
fuzzy entries without being told the tokens again.

A round boundary is marked by LayerParallelDraftModel.after_rollback (called
by DraftEngine when a verification result parts from its continuation, and
on release): it crops the cache and sets `round_start`; the first forward after
it is where the calibration policy applies. `rolled_back` tells whether that
crop dropped tokens (a draft token was rejected): the `on_mismatch` policy.
A plain `crop` only changes the length.
"""

from __future__ import annotations

import itertools

import torch

from workers.model import KVCache

_ids = itertools.count(1)


class DraftKVCache(KVCache):
    def __init__(self, n_layers: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__(n_layers, n_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device)
        self.cache_id = next(_ids)  # names this cache's twins on the other ranks
        self.token_ids = torch.zeros(max_seq_len, dtype=torch.long)  # [S] token at each position (CPU)
        self.exact_length = 0
        self.round_start = True  # the next forward opens a round (set by after_rollback and at creation)
        self.rolled_back = False  # the rollback that opened this round dropped cached tokens

    def crop(self, length: int) -> None:
        super().crop(length)
        self.exact_length = min(self.exact_length, length)

    def record(self, start: int, tokens: torch.Tensor) -> None:
        self.token_ids[start : start + tokens.shape[0]] = tokens.to("cpu")

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, exact={self.exact_length}, id={self.cache_id})"
