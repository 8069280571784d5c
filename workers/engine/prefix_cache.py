"""Prefix caching: a request reuses the KV another request computed for the same prompt prefix.

Both engines feed a prompt in chunks at fixed boundaries, multiples of the chunk size
(scheduler.prefill_chunk_tokens): the verifier prefills all but the prompt's last token
(the newest token opens the first round), the draft feeds chunks until what is left
fits one, which it feeds and drafts from. The KV of a position depends on the extent
of the chunk that computed it: measured on this CPU, a chunk cut at another start
(SmolLM2 in float32: [10, 64) instead of [0, 64)) rounds differently, and a rest of up
to 8 tokens takes the row-by-row attention path instead of the masked one. So reuse
is exact by construction, not by a probe: a prefix is reused only up to a boundary
that a cold run of the new prompt also has, where the source computed it with the
same chunks, i.e. a multiple of the chunk within both prompts, or (the verifier) the
whole prefill when both prompts' prefills end at the same position (n > 1 choices, a
repeated prompt). The rest is fed as a cold run feeds it, so every output is bit for
bit the cold run's. The cost: up to chunk - 1 shared tokens are computed again, and a
shared prefix shorter than a chunk is reused only by the verifier, for a prompt of the
same length.

A cache remembers what it holds (`Held`) when its request ends; `KVPool` hands a
new request the free cache that holds the longest reusable prefix of its prompt
(least recently used among ties), cropped to it; `best_source` finds one among the
running requests' caches, to copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def reusable_prefix(
    held: Sequence[int], held_end: int, prompt: Sequence[int], prefill_end: int, chunk: int, whole: bool = True
) -> int:
    """How many positions of a cache holding the KV of `held` (positions [0, len(held)),
    those before `held_end` computed by its prompt's prefill chunks) a prompt whose
    prefill ends at `prefill_end` may take: a boundary of both chunk schedules.
    whole: a prefill that ended where the new one ends is taken whole (the verifier's,
    which stops before the last token; not the draft's, whose last chunk runs past the
    prompt's end and must be fed again for its logits)."""
    limit = min(len(held), held_end, prefill_end)
    common = common_prefix_len(held[:limit], prompt[:limit])
    if whole and held_end == prefill_end and common == prefill_end:
        return prefill_end
    return common // chunk * chunk


@dataclass
class Held:
    """What a free cache holds: the KV of `tokens`, prefilled for a prompt whose prefill ended at `prefill_end`."""

    tokens: list[int]
    prefill_end: int


class KVPool:
    """KV caches, at most `size`, made on first use. With prefix caching a released cache
    keeps its KV and what it holds; `acquire` reuses the best one for a prompt."""

    def __init__(self, new_cache: Callable[[], object], size: int, chunk: int, prefix_caching: bool, whole: bool = True):
        self._new_cache = new_cache
        self.size = size
        self.chunk = chunk
        self.prefix_caching = prefix_caching
        self.whole = whole  # see reusable_prefix
        self._free: list[tuple[object, Held]] = []  # least recently released first
        self._created = 0

    @property
    def available(self) -> bool:
        return bool(self._free) or self._created < self.size

    def acquire(self, prompt: Sequence[int] | None = None, prefill_end: int = 0) -> tuple[object, int]:
        """A cache and how many positions of the prompt's prefill it already holds (cropped
        to them). prompt None: no reuse (a request that needs its prompt's logits)."""
        best, reused = None, 0
        if self.prefix_caching and prompt is not None:
            for i, (_, held) in enumerate(self._free):
                n = reusable_prefix(held.tokens, held.prefill_end, prompt, prefill_end, self.chunk, self.whole)
                if n > reused:
                    best, reused = i, n
        if best is None:
            # a new cache keeps the free ones' prefixes for later (without prefix caching: the free ones first)
            if self._created < self.size and (self.prefix_caching or not self._free):
                self._created += 1
                return self._new_cache(), 0
            if not self._free:
                raise RuntimeError("no KV cache free")
            best = 0  # the least recently used
        cache, _ = self._free.pop(best)
        cache.crop(reused)
        return cache, reused

    def release(self, cache, tokens: Sequence[int], prefill_end: int) -> None:
        """`cache` holds the KV of `tokens` (its length of them), prefilled up to prefill_end."""
        if not self.prefix_caching:
            cache.crop(0)
        self._free.append((cache, Held(list(tokens[: cache.length]), prefill_end)))


def best_source(sources, prompt: Sequence[int], prefill_end: int, chunk: int, whole: bool = True) -> tuple[object, int]:
    """Among running sequences (cache, tokens whose KV it holds, prefill end), the cache that
    holds the longest reusable prefix of the prompt, and its length (None, 0: none)."""
    best, reused = None, 0
    for cache, tokens, held_end in sources:
        n = reusable_prefix(tokens[: cache.length], held_end, prompt, prefill_end, chunk, whole)
        if n > reused:
            best, reused = cache, n
    return best, reused
