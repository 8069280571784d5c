"""Position-keyed randomness: every random draw is a pure function of
(request seed, stream, position in the token sequence).

Why not one sequential torch.Generator per request: in mode `amusd` the
number of drafts a verification sees depends on timing, so a sequential stream
would be consumed differently run to run. Keyed by position, the draw that
decides the token at position i is the same whatever happened around it, so a
seeded request is reproducible in every mode. Separate streams keep the
draft's sample and the verifier's coin independent (sharing them would bias
the output).
"""

from __future__ import annotations

from typing import Iterable

import torch

COIN = 1  # verifier: accept or reject the draft at a position
PICK = 2  # verifier: draw the recovered/bonus (or plain) token at a position
DRAFT = 3  # draft: sample its proposal at a position

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def keyed_uniform(seed: int, stream: int, position: int) -> float:
    """A uniform in [0, 1) determined by (seed, stream, position)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ stream) ^ position)
    return (x >> 11) * (1.0 / (1 << 53))


def keyed_uniforms(seed: int, stream: int, positions: Iterable[int], device="cpu") -> torch.Tensor:
    """float64 [len(positions)] uniforms, one per position."""
    return torch.tensor([keyed_uniform(seed, stream, p) for p in positions], dtype=torch.float64, device=device)
