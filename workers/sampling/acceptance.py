"""The speculative-decoding acceptance rule, one pure function per decoding kind.

Every mode (``ar``, ``sd``, ``amusd``, ``easyspec``, ``amusd+easyspec``) emits
tokens only through these two functions, so losslessness is proven once here.

Vocabulary (as in vLLM's rejection sampler):

* **accepted tokens**: the longest prefix of the draft tokens ``x1..xk`` that the
  rule keeps.
* **recovered token** (correction): at the first rejected position ``i``, the
  target's own token there instead of ``xi``.
* **bonus token**: when all ``k`` drafts are accepted, the target's token at the
  position after them, for free, because the verify pass computed it anyway.

The target's token at a position is ``argmax p_i`` (greedy) or the winner of
the position's keyed race over ``p_i`` (sampling, see randomness.py). Both rules
are the same rule: keep ``x_i`` while it equals the target's token, then emit the
target's token. So a round always emits ``num_accepted + 1`` tokens, and they are
the tokens the target alone would emit (``k == 0`` is how mode ``ar`` decodes).

Sampling is lossless: each emitted token is the race's winner over the target's
warped distribution ``p``, drawn with probability ``p_j`` exactly, whatever the
draft proposed; the draft runs the same race over its ``q`` to propose
(tests/unit/test_acceptance.py checks the distribution statistically). This is a
coupling of draft and target (as in Gumbel-max speculative sampling), not the
modified rejection sampling of Leviathan et al. 2023: a draft is kept with
probability P(the two races agree) instead of ``1 - TV(p, q)``, and in return a
seeded text does not depend on the draft, the mode or the number of drafts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.sampling.randomness import race

__all__ = ["Acceptance", "accept_greedy", "accept_sampled"]


@dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one round of ``k`` draft tokens.

    Attributes:
        num_accepted: how many draft tokens were kept (a prefix of the drafts), ``0..k``.
        token_ids: the accepted drafts followed by ONE recovered (first
            rejection) or bonus (all accepted) token; ``len == num_accepted + 1``.
    """

    num_accepted: int
    token_ids: list[int]


def _first_false(mask: Tensor) -> int:
    """Index of the first False in a 1-D bool tensor, or its length if all True."""
    return int(torch.cumprod(mask.to(torch.int64), dim=0).sum().item())


def _accept_picks(draft_ids: Tensor, picks: Tensor) -> Acceptance:
    """Keep drafts while they equal the target's picks ``[k+1]``, then emit its pick."""
    k = draft_ids.shape[0]
    if picks.shape[0] != k + 1:
        raise ValueError(f"the target has {picks.shape[0]} rows, expected k+1 = {k + 1}")
    n = _first_false(draft_ids.to(picks.device) == picks[:k]) if k else 0
    return Acceptance(num_accepted=n, token_ids=picks[: n + 1].tolist())  # == draft_ids[:n] + [picks[n]]


def accept_greedy(draft_ids: Tensor, target_logits: Tensor) -> Acceptance:
    """Greedy (temperature 0) verification.

    Keep ``x_i`` while ``x_i == argmax p_i``; at the first mismatch emit
    ``argmax p_i`` (recovered token); if all ``k`` are kept emit
    ``argmax p_{k+1}`` (bonus token). The emitted text is the target's own
    greedy text (ties broken towards the lower token id, as ``torch.argmax``).

    Args:
        draft_ids: ``[k]`` int64 draft tokens, ``k >= 0``.
        target_logits: ``[k+1, V]`` target logits (or probabilities: only the
            argmax matters) at the positions predicting ``x_1..x_k`` and the next token.
    """
    return _accept_picks(draft_ids, torch.argmax(target_logits, dim=-1))


def accept_sampled(draft_ids: Tensor, target_probs: Tensor, seed: int, first_position: int) -> Acceptance:
    """Sampled verification: as accept_greedy, with the winner of each position's race
    (randomness.race, keyed by the request's seed) in place of the argmax.

    Args:
        draft_ids: ``[k]`` int64 draft tokens, ``k >= 0``, each the winner of the draft's
            race at its position (or any proposal: a kept draft is the target's token).
        target_probs: ``[k+1, V]`` the target's warped distributions ``p_i``.
        seed: the request's seed.
        first_position: the position (index in the token sequence) of ``x_1``.
    """
    return _accept_picks(draft_ids, race(target_probs, seed, first_position))
