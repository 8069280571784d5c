"""Position-keyed randomness, and sampling as a race that the draft runs too.

Every random number is a pure function of (request seed, position in the token
sequence, token id). The token at position i is the winner of a race:

    argmax_j  p_j / E_j,   E_j ~ Exp(1) keyed by (seed, i, j)

(the Gumbel-max trick in exponential form: token j wins with probability p_j,
exactly). The draft races its own distribution q with the same E, so it
proposes the target's token wherever p and q agree enough, and the verifier
keeps a draft exactly when it equals the target's winner (acceptance.py).

So the token at a position depends on the target's p there and on the seed
only: not on the draft, nor on how many drafts a round verified, nor on the
mode. A seeded request gives the same text in `ar`, `sd` and `amusd`, alone or
under load, whatever speculation was planned; a round may verify no draft, and
keep its bonus token, without changing it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

RACE = 4  # the key's stream (1-3 were the uniforms of the rule before the race)

_MASK = (1 << 64) - 1
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _splitmix64(x: int) -> int:
    x = (x + _MIX[0]) & _MASK
    x = ((x ^ (x >> 30)) * _MIX[1]) & _MASK
    x = ((x ^ (x >> 27)) * _MIX[2]) & _MASK
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """_splitmix64 of each uint64 (numpy's uint64 arithmetic wraps: the same bits)."""
    x = x + np.uint64(_MIX[0])
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX[1])
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX[2])
    return x ^ (x >> np.uint64(31))


def position_key(seed: int, position: int) -> int:
    """The 64-bit key of a request's race at one position."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK) ^ RACE) ^ position)


def _uniforms(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) of each token id at a position."""
    bits = _splitmix64_array(token_ids.astype(np.uint64) ^ np.uint64(position_key(seed, position)))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _exponential(u: np.ndarray) -> np.ndarray:
    """Exp(1) from uniforms in [0, 1) (inverse CDF)."""
    return -np.log1p(-u)


def race_noise(seed: int, position: int, token_ids: np.ndarray) -> np.ndarray:
    """The race's noise: float64 Exp(1) E_j of each token id at a position (what _winner
    computes for the tokens that can win)."""
    return _exponential(_uniforms(seed, position, token_ids))


def _winner(dist: np.ndarray, seed: int, position: int) -> int:
    """argmax_j dist_j / E_j over the tokens with dist_j > 0, with E computed only where it
    can matter: E_j >= u_j, so dist_j / E_j <= dist_j / u_j, and a token can beat the most
    probable token's score only if dist_j >= score * u_j. The same winner as over all
    tokens (candidates keep their order: ties go to the lower id), at a fraction of the
    logarithms (49k tokens: 0.3 ms against 1.2 ms)."""
    support = np.flatnonzero(dist > 0)
    if not len(support):  # no token to race (NaN logits): any proposal is lossless; a target's row always has one
        return int(np.argmax(dist))
    p = dist[support]
    u = _uniforms(seed, position, support)
    if len(support) > 256:
        top = int(np.argmax(p))
        score = p[top] / _exponential(u[top])
        candidates = np.flatnonzero(p >= score * u)
        support, p, u = support[candidates], p[candidates], u[candidates]
    return int(support[np.argmax(p / _exponential(u))])


def race(probs: Tensor, seed: int, first_position: int) -> Tensor:
    """The race's winner of each row: ``probs [N, V]`` (row r at position first_position + r,
    need not be normalised) -> ``[N]`` int64 token ids. Only tokens with probability > 0 run."""
    rows = probs.detach().to("cpu", torch.float64).numpy()
    winners = [_winner(dist, seed, first_position + r) for r, dist in enumerate(rows)]
    return torch.tensor(winners, dtype=torch.int64, device=probs.device)
