"""Prompt lookup: draft tokens that cost no model pass (mode `lookup`).

The proposal for a request is read from its own tokens (prompt + output), as
vLLM's `ngram` speculative method and llama.cpp's lookup decoding do: take the
request's last n tokens, find their most recent earlier occurrence, and propose
the up-to-k tokens that followed it, trying n from `max_n` down to `min_n`.
Where nothing matches there is no proposal (the round is a plain decode step,
as in `ar`). The copy may run into the tokens it proposes (an LZ77-style
overlapping copy: after a period-p repetition it proposes k tokens, not p).

A proposal is deterministic (q is one-hot), so the acceptance rule keeps the
output lossless: greedy accepts a token iff it is the target's argmax; sampling
accepts it with probability p(x) and otherwise draws from p without x.

`NgramIndex` is the incremental form of the search (a dict per n from each
n-gram to the end of its latest occurrence that has a continuation; O(max_n -
min_n + 1) per new token, O(max_n) per proposal); `lookup` is the plain search
it must agree with.
"""

from __future__ import annotations

from collections.abc import Sequence

from workers.engine.draft_source import DraftStream, Proposal
from workers.engine.request import Request


def _copy(tokens: Sequence[int], end: int, k: int) -> list[int]:
    """Up to k tokens following position `end` (exclusive end of the match),
    continuing into the proposal itself where the source reaches the last token."""
    out: list[int] = []
    length = len(tokens)
    for j in range(k):
        position = end + j
        out.append(tokens[position] if position < length else out[position - length])
    return out


def lookup(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """The reference search: for n = max_n .. min_n, the latest earlier occurrence of
    tokens[-n:] (ending before the last token), and the k tokens that followed it.
    [] when no n-gram of those lengths recurs (or k == 0)."""
    length = len(tokens)
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = list(tokens[length - n :])
        for end in range(length - 1, n - 1, -1):  # end: exclusive end of an occurrence, < length
            if list(tokens[end - n : end]) == suffix:
                return _copy(tokens, end, k)
    return []


class NgramIndex:
    """One request's tokens and, per n in [min_n, max_n], each n-gram's latest end
    position (exclusive) among those followed by at least one token."""

    def __init__(self, min_n: int, max_n: int, tokens: Sequence[int] = ()):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.extend(tokens)

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append tokens; index the n-grams that now have a continuation (those ending
        before the newest token)."""
        start = len(self.tokens)  # ends before the old length were indexed already
        self.tokens.extend(new_tokens)
        tokens = self.tokens
        for end in range(start, len(tokens)):  # the token at `end` follows the n-gram ending there
            for n, ends in self._ends.items():
                if end >= n:
                    ends[tuple(tokens[end - n : end])] = end

    def propose(self, k: int) -> list[int]:
        """What `lookup(self.tokens, k, min_n, max_n)` returns, from the index."""
        tokens = self.tokens
        length = len(tokens)
        if k <= 0:
            return []
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._ends[n].get(tuple(tokens[length - n :]))
            if end is not None:
                return _copy(tokens, end, k)
        return []


class PromptLookup:
    """The DraftSource of mode `lookup`: each round's drafts from the request's own
    tokens (no draft model, no draft worker)."""

    num_stale = 0
    wait_s = 0.0
    wait_for_all = False  # a proposal costs no pass (adaptive speculation counts only its rows)
    holds_back = False  # no draft model: nothing to feed

    def __init__(self, *, num_draft_tokens: int, min_n: int, max_n: int):
        self.num_draft_tokens = num_draft_tokens
        self.max_run_ahead = num_draft_tokens
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[str, NgramIndex] = {}

    def on_admit(self, request: Request, max_run_ahead: int) -> None:
        self._indexes[request.request_id] = NgramIndex(self.min_n, self.max_n, request.tokens)

    def propose(self, request: Request, num_tokens: int, wait: bool = True) -> Proposal:
        token_ids = self._indexes[request.request_id].propose(num_tokens)
        return Proposal(token_ids, len(token_ids))

    def on_verified(self, request: Request, emitted: list[int], max_run_ahead: int) -> None:
        self._indexes[request.request_id].extend(emitted)

    def release(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

    def busy(self) -> bool:
        return False

    def wait_until_idle(self) -> None:
        pass


class LookupFirst(DraftStream):
    """The DraftSource of mode `sd+lookup`: a round takes the lookup's proposal where
    the request's tokens have a match, else the draft model's (a DraftStream).

    The choice for the next round is made when the prefix before it is verified: with
    a lookup proposal the draft worker is told to run 0 ahead (it only follows the
    verified tokens and spends no pass); without one it drafts the round's k."""

    def __init__(self, transport, *, lookup: PromptLookup, **stream_args):
        super().__init__(transport, **stream_args)
        self.lookup = lookup
        self._planned: dict[str, list[int]] = {}  # per request: the next round's lookup drafts
        self.num_lookup_rounds = 0  # rounds that took the lookup's proposal

    def _model_run_ahead(self, request: Request, max_run_ahead: int) -> int:
        planned = self.lookup.propose(request, max_run_ahead).token_ids
        self._planned[request.request_id] = planned
        return 0 if planned else max_run_ahead

    def on_admit(self, request: Request, max_run_ahead: int) -> None:
        self.lookup.on_admit(request, max_run_ahead)
        super().on_admit(request, self._model_run_ahead(request, max_run_ahead))

    def on_verified(self, request: Request, emitted: list[int], max_run_ahead: int) -> None:
        self.lookup.on_verified(request, emitted, max_run_ahead)
        super().on_verified(request, emitted, self._model_run_ahead(request, max_run_ahead))

    def propose(self, request: Request, num_tokens: int, wait: bool = True) -> Proposal:
        planned = self._planned.get(request.request_id)
        if planned:
            self.num_lookup_rounds += 1
            token_ids = planned[:num_tokens]
            return Proposal(token_ids, len(token_ids))
        return super().propose(request, num_tokens, wait)

    def release(self, request_id: str) -> None:
        self.lookup.release(request_id)
        self._planned.pop(request_id, None)
        super().release(request_id)
