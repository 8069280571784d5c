"""The draft side: per-request continuations, rollback, one token at a time.

For each request the draft holds a continuation: the latest verified prefix it
was told about, followed by the tokens it drafted past it. `update` brings a
new verified prefix (a new epoch): if it agrees with the continuation the draft
keeps going (and re-publishes the drafts beyond it under the new epoch);
if it parts at position j, the cache is cropped to j (rollback) and drafting
restarts from the verified tokens. `step` drafts one token for the next request
that is below its run-ahead limit. Mode `sd` sets the limit to k per round;
`amusd` lets the draft run ahead while the target verifies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from protocol.messages import DraftTokens, SamplingParams, VerifiedPrefix
from workers.spec import DRAFT, keyed_uniform, sample_from_uniform, warp


@dataclass
class DraftState:
    cache: object
    sampling: SamplingParams
    epoch: int = 0
    max_run_ahead: int = 0
    verified_len: int = 0
    sequence: list[int] = field(default_factory=list)  # verified prefix + drafted tokens
    probs: list[torch.Tensor] = field(default_factory=list)  # q of each drafted token (sampling)

    @property
    def num_drafted(self) -> int:
        return len(self.sequence) - self.verified_len


@dataclass
class Drafted:
    """Tokens to publish, with their q rows ([n, V]) when sampling."""

    message: DraftTokens
    probs: torch.Tensor | None


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftEngine:
    def __init__(self, model, *, max_model_len: int, max_requests: int, device="cpu"):
        self.model = model
        self.max_model_len = max_model_len
        self.max_requests = max_requests
        self.device = torch.device(device)
        # drafting order: round robin; a full table evicts the oldest (it can always recompute)
        self._states: OrderedDict[str, DraftState] = OrderedDict()
        self._spare_caches: list = []
        self.num_rollbacks = 0
        self.num_drafted = 0

    # -- requests ----------------------------------------------------------

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            state.cache.crop(0)
            self._spare_caches.append(state.cache)

    def _new_state(self, message: VerifiedPrefix) -> DraftState:
        if len(self._states) >= self.max_requests:
            self.release(next(iter(self._states)))
        cache = self._spare_caches.pop() if self._spare_caches else self.model.new_cache(self.max_model_len)
        state = DraftState(cache, message.sampling)
        self._states[message.request_id] = state
        return state

    def update(self, message: VerifiedPrefix) -> Drafted | None:
        """Adopt a new verified prefix; returns drafts still valid under it, re-tagged."""
        state = self._states.get(message.request_id) or self._new_state(message)
        tokens = message.tokens
        state.epoch = message.epoch  # always: drafts are tagged with the newest epoch seen
        state.max_run_ahead = message.max_run_ahead
        state.sampling = message.sampling
        common = common_prefix_len(state.sequence, tokens)
        if common == len(tokens):  # the verifier kept to our continuation: go on
            state.probs = state.probs[len(tokens) - state.verified_len :] if state.probs else []
            state.verified_len = len(tokens)
            on_verified = getattr(self.model, "on_verified", None)
            if on_verified is not None:  # EasySpec: recalibrate the newly verified tokens' KV
                on_verified(state.cache, min(len(tokens), state.cache.length))
            if state.num_drafted == 0:
                return None
            probs = torch.stack(state.probs) if state.probs else None
            ahead = state.sequence[len(tokens) :]
            return Drafted(DraftTokens(message.request_id, state.epoch, len(tokens), ahead, probs is not None), probs)
        if common < len(state.sequence):
            self.num_rollbacks += 1  # the verifier parted from our continuation at `common`
        state.cache.crop(min(state.cache.length, common))
        state.sequence = list(tokens)
        state.verified_len = len(tokens)
        state.probs = []
        return None

    # -- drafting ----------------------------------------------------------

    def _next_state(self) -> tuple[str, DraftState] | None:
        for request_id, state in self._states.items():
            if state.num_drafted < state.max_run_ahead and len(state.sequence) < self.max_model_len:
                self._states.move_to_end(request_id)  # round robin across requests
                return request_id, state
        return None

    @property
    def has_work(self) -> bool:
        return any(
            s.num_drafted < s.max_run_ahead and len(s.sequence) < self.max_model_len for s in self._states.values()
        )

    @torch.inference_mode()
    def step(self) -> Drafted | None:
        """Draft one token for the next request with room to run ahead."""
        picked = self._next_state()
        if picked is None:
            return None
        request_id, state = picked
        # feed everything not yet in the cache (the last token is never fed until now)
        feed = state.sequence[state.cache.length :]
        logits = self.model.forward(torch.tensor(feed, dtype=torch.long, device=self.device), state.cache)
        position = len(state.sequence)
        sampling = state.sampling
        probs = None
        if sampling.greedy:
            token = int(logits[-1].argmax())
        else:
            q = warp(logits[-1:], sampling.temperature, sampling.top_k, sampling.top_p)  # [1, V]
            u = torch.tensor([keyed_uniform(sampling.seed, DRAFT, position)], dtype=torch.float64)
            token = int(sample_from_uniform(q, u.to(q.device))[0])
            state.probs.append(q[0])
            probs = q
        state.sequence.append(token)
        self.num_drafted += 1
        return Drafted(DraftTokens(request_id, state.epoch, position, [token], probs is not None), probs)

    def drafts_of(self, request_id: str) -> list[int]:
        """The tokens drafted past the verified prefix (for tests and stats)."""
        state = self._states.get(request_id)
        return [] if state is None else state.sequence[state.verified_len :]
