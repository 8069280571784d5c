"""Per-position logits processing: the request's controls that depend on the tokens before a position.

One pipeline, the table ``STAGES``, in vLLM v1's order: ``min_tokens`` (the
stop tokens are impossible until enough tokens are out), ``logit_bias``, then
the penalties (repetition over prompt and output tokens, frequency and
presence over output tokens only). Temperature, ``min_p``, top-k and top-p
come after it, in :func:`workers.sampling.warping.warp`.

Vectorized over the rows of one request's pass: row ``i`` predicts the token
after ``tokens + drafts[:i]``, so a drafted position sees the drafts before it
exactly as the target alone would have seen them had it emitted them. The
verifier processes its ``k+1`` rows in one call; the draft processes the one
row it samples from, with the tokens it drafted as part of ``tokens``. Both
then compare distributions that went through the same processing, which is
what keeps speculation lossless (and acceptance high) with the controls on.

:func:`process_logits` is pure (it never writes into its input). A stage is
``(name, active(sampling) -> bool, apply(logits [N, V], rows: Rows, sampling) -> [N, V])``
and may write into the float32 logits it is given (the pipeline's own copy:
one copy of ``[N, V]`` per call, not one per stage); stages work on the few
columns they change (the tokens that occurred, the biased ones, the stop
tokens), never a dense ``[N, V]`` temporary. Stages that are not active cost
nothing, so a request without controls pays nothing here. A new per-position control (a grammar's allowed-token mask) is
one more row of the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from torch import Tensor

from protocol.messages import SamplingParams
from workers.sampling.warping import warp

__all__ = ["Rows", "STAGES", "process_logits", "output_counts", "warp_with"]


@dataclass(frozen=True)
class Rows:
    """What the stages know about the rows of one request's logits.

    Attributes:
        tokens: every token before row 0 (the prompt, then the outputs so far).
        num_prompt: how many of ``tokens`` are the prompt.
        drafts: the drafted tokens between the rows: row ``i`` comes after
            ``tokens + drafts[:i]`` (``len(drafts) == N - 1``; empty for one row).
        stop_token_ids: the tokens that end the request (``min_tokens`` masks them).
    """

    tokens: Sequence[int]
    num_prompt: int
    drafts: Sequence[int] = ()
    stop_token_ids: Collection[int] = ()


Stage = Callable[[Tensor, Rows, SamplingParams], Tensor]


def num_outputs(rows: Rows) -> int:
    """How many output tokens come before row 0 (row i has i more)."""
    return len(rows.tokens) - rows.num_prompt


def _ids(tokens: Sequence[int], device) -> Tensor:
    return torch.tensor(list(tokens), dtype=torch.int64, device=device)


def output_counts(rows: Rows, num_rows: int, columns: Tensor) -> Tensor:
    """``[N, U]`` float32: how often each token of ``columns`` (sorted, unique ids) occurs
    among the output tokens before each row (the drafts before it included)."""
    device = columns.device
    outputs = _ids(rows.tokens[rows.num_prompt :], device)
    counts = torch.bincount(torch.searchsorted(columns, outputs), minlength=columns.numel()).to(torch.float32)
    counts = counts.expand(num_rows, -1).clone()
    if num_rows > 1:
        drafts = torch.searchsorted(columns, _ids(rows.drafts[: num_rows - 1], device))
        steps = torch.zeros_like(counts)
        steps[torch.arange(1, num_rows, device=device), drafts] = 1.0  # draft i is seen from row i+1 on
        counts += torch.cumsum(steps, dim=0)
    return counts


def apply_min_tokens(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """Rows with fewer than ``min_tokens`` outputs before them cannot stop: their stop tokens get -inf.
    Those rows are a prefix (row i has i more outputs before it than row 0)."""
    num_rows, vocab = logits.shape
    early = min(num_rows, sampling.min_tokens - num_outputs(rows))
    stop_ids = sorted(t for t in rows.stop_token_ids if 0 <= t < vocab)
    if early <= 0 or not stop_ids:
        return logits
    logits[:early, stop_ids] = float("-inf")
    return logits


def apply_logit_bias(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """Add each biased token's bias to its logit, at every row."""
    vocab = logits.shape[-1]
    items = [(t, b) for t, b in sampling.logit_bias.items() if 0 <= t < vocab]
    if not items:
        return logits
    ids = _ids([t for t, _ in items], logits.device)
    bias = torch.tensor([b for _, b in items], dtype=logits.dtype, device=logits.device)
    return logits.index_add_(1, ids, bias.expand(logits.shape[0], -1))


def apply_penalties(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """vLLM's penalties. Repetition (``r``): a token seen in the prompt or the
    output before the row has its logit divided by ``r`` when positive,
    multiplied by ``r`` otherwise. Frequency (``f``) and presence (``p``):
    ``logit - f * count - p * (count > 0)``, counting output tokens only.

    Only the columns of tokens that occur (prompt, outputs, drafts) can change:
    the work is on those ``U`` columns, not the vocabulary."""
    num_rows, vocab = logits.shape
    device = logits.device
    seen_any = _ids([*rows.tokens, *rows.drafts[: num_rows - 1]], device)
    columns = torch.unique(seen_any[(seen_any >= 0) & (seen_any < vocab)])  # sorted
    if columns.numel() == 0:
        return logits
    counts = output_counts(rows, num_rows, columns)  # [N, U]
    seen = counts > 0
    cols = logits[:, columns]  # [N, U]
    if sampling.repetition_penalty != 1.0:
        r = sampling.repetition_penalty
        in_prompt = torch.zeros(columns.numel(), dtype=torch.bool, device=device)
        prompt = _ids(rows.tokens[: rows.num_prompt], device)
        in_prompt[torch.searchsorted(columns, prompt[(prompt >= 0) & (prompt < vocab)])] = True
        penalized = torch.where(cols > 0, cols / r, cols * r)
        cols = torch.where(seen | in_prompt, penalized, cols)
    if sampling.frequency_penalty != 0.0:
        cols = cols - sampling.frequency_penalty * counts
    if sampling.presence_penalty != 0.0:
        cols = cols - sampling.presence_penalty * seen.to(cols.dtype)
    return logits.index_copy_(1, columns, cols)


def _has_penalties(s: SamplingParams) -> bool:
    return s.repetition_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0


# The pipeline, in order: (name, active for these sampling params?, stage).
STAGES: tuple[tuple[str, Callable[[SamplingParams], bool], Stage], ...] = (
    ("min_tokens", lambda s: s.min_tokens > 0, apply_min_tokens),
    ("logit_bias", lambda s: bool(s.logit_bias), apply_logit_bias),
    ("penalties", _has_penalties, apply_penalties),
)


def process_logits(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """``[N, V]`` logits -> ``[N, V]`` float32 processed logits (greedy takes their argmax,
    sampling warps them). Returns the input unchanged when no stage is active."""
    active = [stage for _, is_active, stage in STAGES if is_active(sampling)]
    if not active:
        return logits
    if len(rows.drafts) < logits.shape[0] - 1:
        raise ValueError(f"{logits.shape[0]} rows need {logits.shape[0] - 1} drafts, got {len(rows.drafts)}")
    out = logits.to(torch.float32, copy=True)  # the stages write into it
    for stage in active:
        out = stage(out, rows, sampling)
    return out


def warp_with(scores: Tensor, sampling: SamplingParams) -> Tensor:
    """The sampled distribution of processed logits: temperature, min_p, top-k, top-p (see warp)."""
    return warp(scores, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
