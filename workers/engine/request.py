"""Per-request state inside the verify engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from protocol.messages import GenerateRequest, SamplingParams

# Verifier and draft draw from separate streams derived from the request seed:
# sharing one stream would correlate the draft's sample with the acceptance
# coin and bias the output.
_VERIFY_STREAM = 0x5EED_0001
_DRAFT_STREAM = 0x5EED_0002


def make_generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 0x9E3779B1 + stream) % (2**63))
    return generator


def verify_generator(sampling: SamplingParams, device="cpu") -> torch.Generator:
    return make_generator(sampling.seed, _VERIFY_STREAM, device)


def draft_generator(sampling: SamplingParams, device="cpu") -> torch.Generator:
    return make_generator(sampling.seed, _DRAFT_STREAM, device)


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int]
    num_logprobs: int | None
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    cache: object = None  # the target's KVCache while running
    arrival_time: float = field(default_factory=time.monotonic)
    queue_time_s: float | None = None
    round_id: int = 0

    @classmethod
    def from_message(cls, message: GenerateRequest, device="cpu") -> "Request":
        return cls(
            request_id=message.request_id,
            prompt_ids=list(message.prompt_ids),
            max_tokens=message.max_tokens,
            sampling=message.sampling,
            stop_token_ids=frozenset(message.stop_token_ids),
            num_logprobs=message.num_logprobs,
            generator=verify_generator(message.sampling, device),
        )

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)
