"""Per-request state inside the verify engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol.messages import GenerateRequest, SamplingParams
from workers.sampling import Rows


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    num_logprobs: int | None
    prompt_logprobs: int | None = None  # top N for the prompt's logprobs (None: not asked)
    num_draft_tokens: int | None = None  # the request's own cap on drafts per round (None: none)
    planned_drafts: int | None = None  # adaptive speculation: drafts the latest plan gave its round
    draft_run_ahead: int = 0  # the run-ahead the draft was last told: a round takes no more drafts
    draft_fed: int = 0  # adaptive: the request's tokens as of its latest round with drafts (the draft fed them)
    output_ids: list[int] = field(default_factory=list)
    cache: object = None  # the target's KVCache while running
    arrival_time: float = field(default_factory=time.monotonic)
    queue_time_s: float | None = None
    # (chosen [n-1], top [n-1] of (id, logprob)) from the prefill, until the first output carries them
    prompt_scores: tuple[list[float], list[list[tuple[int, float]]]] | None = None
    grammar: object = None  # a GrammarState over output_ids when the request has a grammar

    @classmethod
    def from_message(cls, message: GenerateRequest) -> "Request":
        return cls(
            request_id=message.request_id,
            prompt_ids=list(message.prompt_ids),
            max_tokens=message.max_tokens,
            sampling=message.sampling,
            stop_token_ids=frozenset(message.stop_token_ids),
            num_logprobs=message.num_logprobs,
            prompt_logprobs=message.prompt_logprobs,
            num_draft_tokens=message.num_draft_tokens,
        )

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def rows(self, drafts: list[int]) -> Rows:
        """The logits processors' view of a pass over the newest token and `drafts`."""
        return Rows(self.tokens, len(self.prompt_ids), drafts, self.stop_token_ids)

    @property
    def prefill_end(self) -> int:
        """The prompt's prefill covers positions [0, prefill_end): all but its last token."""
        return len(self.prompt_ids) - 1

    @property
    def reuses_prefix(self) -> bool:
        """May take a cached prefix: not when it needs the prompt's logits (prompt logprobs)."""
        return self.prompt_logprobs is None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
