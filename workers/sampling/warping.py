"""Turning target/draft logits into the request's sampling distribution.

gpt-fast style tiny helpers: ``warp`` (logits -> warped probabilities; tokens
are drawn from them by randomness.race) and ``logprobs_of`` (raw
log-probabilities for the OpenAI ``logprobs`` fields). Every function is pure:
tensors in, tensors out.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["warp", "logprobs_of"]


def warp(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Return the request's warped distribution over the vocabulary.

    Args:
        logits: ``[N, V]`` raw logits, any float dtype (``-inf`` entries allowed).
        temperature: ``> 0``. Greedy decoding (temperature 0) is not a
            distribution; the caller routes it to :func:`accept_greedy`.
        top_k: keep the ``top_k`` largest logits of each row (``0`` or
            ``>= V`` keeps all). Logits tied with the k-th largest are kept
            too (as Hugging Face's ``TopKLogitsWarper`` does), so the result
            does not depend on the order of equal values.
        top_p: nucleus sampling: after top-k, keep the smallest set of the most
            probable tokens whose mass is ``>= top_p`` (always at least the
            most probable token). ``1.0`` keeps all. Among equal probabilities
            the lower token id comes first (stable sort).
        min_p: after temperature and before top-k (vLLM's order), drop the
            tokens whose probability is below ``min_p`` times the most probable
            one's. ``0.0`` keeps all.

    Returns:
        ``[N, V]`` float32 probabilities; each row sums to 1 and removed tokens
        are exactly 0.
    """
    if not temperature > 0:
        raise ValueError(f"warp needs temperature > 0, got {temperature} (greedy is handled by the caller)")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")

    scores = logits.float()  # [N, V]
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]

    if min_p > 0.0:  # p < min_p * p_max  <=>  logit < logit_max + log(min_p): no softmax needed
        floor = scores.amax(dim=-1, keepdim=True) + math.log(min_p)
        scores = scores.masked_fill(scores < floor, float("-inf"))

    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))

    probs = torch.softmax(scores, dim=-1)  # [N, V]

    if top_p < 1.0:
        # on a CPU row by row (see _nucleus); elsewhere one sort of every row, without host syncs
        keep = torch.stack([_nucleus(row, top_p) for row in probs]) if probs.device.type == "cpu" else _kept_by_sort(probs, top_p)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _kept_by_sort(probs: Tensor, top_p: float) -> Tensor:
    """[..., V] probabilities -> [..., V] bool: the tokens top_p keeps. In the order of
    decreasing probability (equal ones by lower id: a stable sort), a token is kept while the
    mass of the tokens before it is below top_p (the first one always)."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    drop_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # mass of strictly better tokens
    drop_sorted[..., 0] = False
    return ~torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


# Candidate thresholds (times the row's top probability) _nucleus tries in turn, before the whole row.
NUCLEUS_SCALES = (1e-2, 1e-4)


def _nucleus(p: Tensor, top_p: float) -> Tensor:
    """[V] probabilities -> [V] bool: what _kept_by_sort keeps, sorting fewer tokens.

    Sorting a whole 49,152-token row took 5.4 ms on this CPU, where the nucleus of a real model
    is mostly a few tokens to a few hundred. The tokens at or above a threshold form a prefix of
    the sorted order (equal probabilities fall on one side together), so sorting only them gives
    the same first tokens and the same running mass; where the mass reaches top_p inside them
    (some of them are dropped) the rest are dropped anyway, else the next, lower threshold is
    tried, down to the whole row."""
    top = p.max()
    for scale in NUCLEUS_SCALES:
        ids = (p >= top * scale).nonzero().squeeze(1)  # ascending ids
        kept = _kept_by_sort(p[ids], top_p)
        if not kept.all():
            return torch.zeros_like(p, dtype=torch.bool).index_fill_(0, ids[kept], True)
    return _kept_by_sort(p, top_p)


def logprobs_of(logits: Tensor, token_ids: Tensor, num_top: int) -> tuple[Tensor, Tensor, Tensor]:
    """Raw (unwarped) float32 log-probabilities for the OpenAI ``logprobs`` fields.

    Args:
        logits: ``[N, V]`` raw logits.
        token_ids: ``[N]`` the tokens actually emitted at each row.
        num_top: how many alternatives to report per row (0 allowed).

    Returns:
        ``(chosen [N] float32, top_ids [N, num_top] int64, top_lps [N, num_top] float32)``,
        top entries in descending order of log-probability.
    """
    lps = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = lps.gather(-1, token_ids.long().view(-1, 1)).squeeze(-1)  # [N]
    top_lps, top_ids = torch.topk(lps, num_top, dim=-1)  # [N, num_top]
    return chosen, top_ids, top_lps
