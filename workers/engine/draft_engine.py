"""The draft side: per-request draft caches, rollback, drafting.

The draft keeps, per request, the tokens whose KV it holds. A DraftRequest
brings the full verified sequence: the cache is cropped to the longest common
prefix (a rollback when the verifier rejected something), the rest is fed, and
k tokens are drafted one at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from protocol.messages import DraftRequest
from workers.engine.request import draft_generator
from workers.spec import sample, warp


@dataclass
class DraftState:
    cache: object
    generator: torch.Generator
    cached_tokens: list[int] = field(default_factory=list)  # tokens whose KV is in `cache`


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
        # least recently used first; a full table evicts (the draft may always recompute)
        self._states: OrderedDict[str, DraftState] = OrderedDict()
        self._spare_caches: list = []
        self.num_rollbacks = 0

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            state.cache.crop(0)
            self._spare_caches.append(state.cache)

    def _state_for(self, message: DraftRequest) -> DraftState:
        state = self._states.get(message.request_id)
        if state is not None:
            self._states.move_to_end(message.request_id)
            return state
        if len(self._states) >= self.max_requests:
            self.release(next(iter(self._states)))
        cache = self._spare_caches.pop() if self._spare_caches else self.model.new_cache(self.max_model_len)
        state = DraftState(cache, draft_generator(message.sampling, self.device))
        self._states[message.request_id] = state
        return state

    @torch.inference_mode()
    def draft(self, message: DraftRequest) -> tuple[list[int], torch.Tensor | None]:
        """Draft message.num_tokens tokens after message.tokens.

        Returns the token ids and, when sampling, their warped distributions q
        ([k, V] float32); None for greedy drafts.
        """
        state = self._state_for(message)
        tokens = message.tokens
        keep = min(common_prefix_len(state.cached_tokens, tokens), len(tokens) - 1)
        if keep < len(state.cached_tokens):
            self.num_rollbacks += 1  # the verifier parted from what this cache holds
        state.cache.crop(keep)
        state.cached_tokens = tokens[:keep]
        budget = min(message.num_tokens, self.max_model_len - len(tokens) + 1)
        if budget <= 0:
            return [], None
        feed = tokens[keep:]
        sampling = message.sampling

        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        logits = self.model.forward(torch.tensor(feed, dtype=torch.long, device=self.device), state.cache)
        for i in range(budget):
            if sampling.greedy:
                token = int(logits[-1].argmax())
            else:
                q = warp(logits[-1:], sampling.temperature, sampling.top_k, sampling.top_p)
                token = int(sample(q, state.generator)[0])
                probs.append(q[0])
            drafted.append(token)
            if i + 1 < budget:
                logits = self.model.forward(torch.tensor([token], dtype=torch.long, device=self.device), state.cache)
        # the last draft token is not fed: its KV would be wasted if it is rejected
        state.cached_tokens = tokens + drafted[:-1]
        return drafted, (torch.stack(probs) if probs else None)
