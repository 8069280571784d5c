"""The speculative-decoding acceptance rule, one pure function per decoding kind.

Every mode (``ar``, ``sd``, ``amusd``, ``easyspec``, ``amusd+easyspec``) emits
tokens only through these two functions, so losslessness is proven once here.

Vocabulary (as in vLLM's rejection sampler):

* **accepted tokens**: the longest prefix of the draft tokens ``x1..xk`` that the
  rule keeps.
* **recovered token** (correction): at the first rejected position ``i``, a token
  drawn from the target instead of ``xi`` (greedy: ``argmax p_i``; sampled: from
  ``normalize(max(0, p_i - q_i))``).
* **bonus token**: when all ``k`` drafts are accepted, one extra token drawn from
  the target's last distribution ``p_{k+1}`` (greedy: its argmax), for free,
  because the verify pass computed it anyway.

So a round always emits ``num_accepted + 1`` tokens: the accepted drafts and
exactly one recovered-or-bonus token. With ``k == 0`` the rule is plain
decoding from ``p_1``; that is how mode ``ar`` samples.

Sampling is lossless: the emitted tokens follow the target's warped
distribution ``p`` exactly, whatever ``q`` is (Leviathan et al. 2023, Chen et
al. 2023). ``tests/unit/test_acceptance.py`` checks this statistically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.sampling.warping import sample_from_uniform

__all__ = ["Acceptance", "accept_greedy", "accept_sampled"]

# A residual with less mass than this is float noise of p == q; sample from p instead.
_RESIDUAL_EPS = 1e-6


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
    k = draft_ids.shape[0]
    if target_logits.shape[0] != k + 1:
        raise ValueError(f"target_logits has {target_logits.shape[0]} rows, expected k+1 = {k + 1}")
    best = torch.argmax(target_logits, dim=-1)  # [k+1]
    n = _first_false(draft_ids.to(best.device) == best[:k]) if k else 0
    tokens = best[: n + 1].tolist()  # == draft_ids[:n] followed by best[n]
    return Acceptance(num_accepted=n, token_ids=tokens)


def accept_sampled(
    draft_ids: Tensor,
    draft_probs: Tensor | None,
    target_probs: Tensor,
    coins: Tensor,
    picks: Tensor,
) -> Acceptance:
    """Sampled verification (modified rejection sampling), lossless w.r.t. ``p``.

    Keep ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``. At the first
    rejection emit a recovered token drawn from ``normalize(max(0, p_i - q_i))``
    (a greedy draft has one-hot ``q_i``: ``p_i`` with ``x_i`` removed); if the
    residual is numerically empty (``p_i == q_i``) draw from ``p_i``. If all
    ``k`` are kept, draw the bonus token from ``p_{k+1}``. ``k == 0`` is plain
    sampling from ``p_1``.

    Randomness is passed in, one uniform per decision and position, so that
    the token at position ``i`` depends only on that position's uniforms (see
    workers/sampling/randomness.py: this keeps seeded requests reproducible when
    the number of drafts per round varies): ``coins[i]`` decides draft ``i``;
    ``picks[i]`` draws the recovered token when ``i`` is the first rejection,
    ``picks[k]`` the bonus token (inverse CDF, :func:`sample_from_uniform`).
    With ``k == 0`` it is ``sample_from_uniform(target_probs, picks)``.

    Args:
        draft_ids: ``[k]`` int64 draft tokens, ``k >= 0``.
        draft_probs: ``[k, V]`` the draft's warped distributions ``q_i`` the
            tokens were sampled from, or ``None`` for a greedy draft.
        target_probs: ``[k+1, V]`` the target's warped distributions ``p_i``.
        coins: ``[k]`` float64 uniforms in [0, 1), one per draft.
        picks: ``[k+1]`` float64 uniforms in [0, 1), one per position.
    """
    k = draft_ids.shape[0]
    if target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows, expected k+1 = {k + 1}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs has shape {tuple(draft_probs.shape)}, expected {(k, target_probs.shape[1])}")
    if coins.shape[0] != k or picks.shape[0] != k + 1:
        raise ValueError(f"need {k} coins and {k + 1} picks, got {coins.shape[0]} and {picks.shape[0]}")
    device = target_probs.device

    n = 0
    if k:
        ids = draft_ids.to(device=device, dtype=torch.int64)
        rows = torch.arange(k, device=device)
        p_x = target_probs[rows, ids].float()  # [k]
        q_x = draft_probs[rows, ids].float() if draft_probs is not None else torch.ones_like(p_x)
        # u < p/q without dividing (q == 0 with p > 0 accepts; both zero rejects).
        n = _first_false(coins.to(device) * q_x < p_x)

    if n < k:  # recovered token from the residual at the first rejection
        p = target_probs[n].float()
        if draft_probs is not None:
            residual = torch.clamp(p - draft_probs[n].float(), min=0.0)
        else:
            residual = p.clone()
            residual[ids[n]] = 0.0
        mass = residual.sum()
        dist = residual if mass.item() > _RESIDUAL_EPS else p  # sampling normalises
    else:  # bonus token
        dist = target_probs[k].float()
    last = int(sample_from_uniform(dist.view(1, -1), picks[n : n + 1].to(device)).item())
    return Acceptance(num_accepted=n, token_ids=draft_ids[:n].tolist() + [last])
