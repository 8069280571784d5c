"""The interface a draft model offers DraftEngine, and the plain model's adapter.

DraftEngine calls every hook explicitly: `after_rollback` when the verifier
parts from the draft's continuation (or a cache is released), `after_verified`
when a verification kept to it. A plain LlamaModel needs neither; the EasySpec
draft (workers/easyspec) calibrates its fuzzy KV cache in them.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from workers.model import KVCache, LlamaModel, ModelArgs
from workers.model.model import Segment


class DraftModel(Protocol):
    @property
    def args(self) -> ModelArgs: ...

    def new_cache(self, max_seq_len: int) -> KVCache: ...

    def forward(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1) -> torch.Tensor:
        """tokens [T] at positions cache.length.. -> logits [num_logits, V] float32."""
        ...

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        """Several requests in one pass, each its own segment (tokens, cache, num_logits)
        over its own cache: logits [num_logits, V] float32 per segment."""
        ...

    def after_rollback(self, cache: KVCache, keep: int) -> None:
        """The verifier's answer opens a round: keep the first `keep` cached positions
        (a rollback when the cache holds more); the next forward starts the round."""
        ...

    def after_verified(self, cache: KVCache, verified_len: int) -> None:
        """A verification kept to the draft's continuation: the first `verified_len`
        cached positions are now verified, and drafting goes on past them."""
        ...

    def stats(self) -> dict[str, float] | None:
        """Counters for /metrics, or None."""
        ...

    def close(self) -> None: ...


class PlainDraft:
    """A LlamaModel as a draft: rounds need nothing but a crop."""

    def __init__(self, model: LlamaModel):
        self.model = model

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def new_cache(self, max_seq_len: int) -> KVCache:
        return self.model.new_cache(max_seq_len)

    def forward(self, tokens: torch.Tensor, cache: KVCache, num_logits: int = 1) -> torch.Tensor:
        return self.model.forward(tokens, cache, num_logits)

    def forward_batch(self, segments: Sequence[Segment]) -> list[torch.Tensor]:
        return self.model.forward_batch(segments)

    def after_rollback(self, cache: KVCache, keep: int) -> None:
        cache.crop(keep)

    def after_verified(self, cache: KVCache, verified_len: int) -> None:
        pass

    def stats(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        pass
