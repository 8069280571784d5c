"""Where a round's draft tokens come from: the seam between modes.

A mode is a choice of DraftSource: `NoDraft` (mode `ar`), `LocalDraft` (a
DraftEngine in this process: tests), or a remote draft worker (workers/verify.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from protocol.messages import DraftRequest
from workers.engine.request import Request


@dataclass(frozen=True)
class Proposal:
    token_ids: list[int]
    probs: torch.Tensor | None = None  # [k, V] warped q; None for greedy drafts

    @staticmethod
    def empty() -> "Proposal":
        return Proposal([])


class DraftSource(Protocol):
    num_draft_tokens: int

    def propose(self, request: Request, num_tokens: int) -> Proposal: ...

    def release(self, request_id: str) -> None: ...


class NoDraft:
    """Mode `ar`: the target alone."""

    num_draft_tokens = 0

    def propose(self, request: Request, num_tokens: int) -> Proposal:
        return Proposal.empty()

    def release(self, request_id: str) -> None:
        pass


class LocalDraft:
    """A DraftEngine driven directly (same process)."""

    def __init__(self, engine, num_draft_tokens: int):
        self.engine = engine
        self.num_draft_tokens = num_draft_tokens

    def propose(self, request: Request, num_tokens: int) -> Proposal:
        request.round_id += 1
        message = DraftRequest(request.request_id, request.round_id, request.tokens, num_tokens, request.sampling)
        token_ids, probs = self.engine.draft(message)
        return Proposal(token_ids, probs)

    def release(self, request_id: str) -> None:
        self.engine.release(request_id)
