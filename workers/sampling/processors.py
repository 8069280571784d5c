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

Every function is pure: tensors in, tensors out. A stage is
``(name, active(sampling) -> bool, apply(logits [N, V], rows: Rows, sampling) -> [N, V])``;
stages that are not active cost nothing, so a request without controls pays
nothing here. A new per-position control (a grammar's allowed-token mask) is
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


def num_outputs(rows: Rows, num_rows: int) -> Tensor:
    """``[N]`` int64: how many output tokens come before each row."""
    return torch.arange(num_rows, dtype=torch.int64) + (len(rows.tokens) - rows.num_prompt)


def output_counts(rows: Rows, num_rows: int, vocab: int, device) -> Tensor:
    """``[N, V]`` float32: how often each token occurs among the output tokens before each row."""
    outputs = torch.tensor(list(rows.tokens[rows.num_prompt :]), dtype=torch.int64, device=device)
    base = torch.bincount(outputs, minlength=vocab)[:vocab].to(torch.float32)  # [V]
    counts = base.expand(num_rows, vocab).clone()
    if num_rows > 1:
        drafts = torch.tensor(list(rows.drafts[: num_rows - 1]), dtype=torch.int64, device=device)
        steps = torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)
        steps[torch.arange(1, num_rows, device=device), drafts] = 1.0  # draft i is seen from row i+1 on
        counts += torch.cumsum(steps, dim=0)
    return counts


def apply_min_tokens(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """Rows with fewer than ``min_tokens`` outputs before them cannot stop: their stop tokens get -inf."""
    num_rows, vocab = logits.shape
    early = num_outputs(rows, num_rows).to(logits.device) < sampling.min_tokens  # [N]
    stop_ids = [t for t in rows.stop_token_ids if 0 <= t < vocab]
    if not stop_ids or not bool(early.any()):
        return logits
    mask = torch.zeros(num_rows, vocab, dtype=torch.bool, device=logits.device)
    mask[:, stop_ids] = True
    return logits.masked_fill(mask & early[:, None], float("-inf"))


def apply_logit_bias(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """Add each biased token's bias to its logit, at every row."""
    vocab = logits.shape[-1]
    items = [(t, b) for t, b in sampling.logit_bias.items() if 0 <= t < vocab]
    if not items:
        return logits
    bias = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
    bias[torch.tensor([t for t, _ in items], device=logits.device)] = torch.tensor(
        [b for _, b in items], dtype=logits.dtype, device=logits.device
    )
    return logits + bias


def apply_penalties(logits: Tensor, rows: Rows, sampling: SamplingParams) -> Tensor:
    """vLLM's penalties. Repetition (``r``): a token seen in the prompt or the
    output before the row has its logit divided by ``r`` when positive,
    multiplied by ``r`` otherwise. Frequency (``f``) and presence (``p``):
    ``logit - f * count - p * (count > 0)``, counting output tokens only."""
    num_rows, vocab = logits.shape
    counts = output_counts(rows, num_rows, vocab, logits.device)  # [N, V]
    seen = counts > 0
    if sampling.repetition_penalty != 1.0:
        prompt = torch.tensor(list(rows.tokens[: rows.num_prompt]), dtype=torch.int64, device=logits.device)
        in_prompt = torch.bincount(prompt, minlength=vocab)[:vocab] > 0  # [V]
        r = sampling.repetition_penalty
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen | in_prompt, penalized, logits)
    if sampling.frequency_penalty != 0.0:
        logits = logits - sampling.frequency_penalty * counts
    if sampling.presence_penalty != 0.0:
        logits = logits - sampling.presence_penalty * seen.to(logits.dtype)
    return logits


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
    out = logits.float()
    for stage in active:
        out = stage(out, rows, sampling)
    return out


def warp_with(scores: Tensor, sampling: SamplingParams) -> Tensor:
    """The sampled distribution of processed logits: temperature, min_p, top-k, top-p (see warp)."""
    return warp(scores, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p)
