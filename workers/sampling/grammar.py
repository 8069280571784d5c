"""Grammar-constrained decoding (response_format, tool_choice): a per-position logits stage.

A request with a grammar (protocol.messages.Grammar: a JSON schema) gets a
`GrammarState` in each worker: an llguidance matcher advanced through the
request's generated tokens. Before warping or argmax, every row of logits is
masked to the tokens the grammar allows at its position (-inf elsewhere), and
it is the same function of the tokens before that position in the draft and in
the target:

- the draft masks the row it drafts from, then advances its state by the token
  (`next_mask` + `append`), and rolls back to the verified prefix on a
  rejection (`truncate`);
- the target masks each of the k+1 rows of a verification with the state
  advanced through the drafts before it (`mask_rows`), then advances by the
  emitted tokens.

So the acceptance rule sees the constrained target distribution p' = warp(mask(logits))
at every position: speculation stays lossless with respect to the constrained target.

Tokens past the end of the grammar (after a stop token; drafts can run past it)
are allowed only stop tokens and are not fed to the matcher. A draft row whose
allowed tokens all have -inf logits (a reduced FR-Spec head) proposes uniformly
among the allowed tokens: any proposal distribution is lossless.

Why llguidance: measured by bench/grammar_libs.py (mask + advance per token).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from protocol.grammars import GrammarError, compiled_grammar
from protocol.messages import Grammar

__all__ = ["GrammarError", "Grammars", "GrammarState", "apply_bitmask", "bitmask_allows", "draft_scores", "mask_logits"]


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def bitmask_allows(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[R, W] int32 CPU bitmask (bit j of word w: token 32 w + j allowed) -> [R, vocab_size] bool."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")  # [R, 32 W]
    return torch.from_numpy(bits[:, :vocab_size]).bool()


def apply_bitmask(logits: Tensor, bitmask: Tensor) -> Tensor:
    """float32 `logits` [R, V] with the tokens the bitmask forbids at -inf (a new tensor)."""
    allowed = bitmask_allows(bitmask, logits.shape[-1]).to(logits.device)
    return torch.where(allowed, logits.float(), float("-inf"))


class Grammars:
    """A worker's grammar factory: its tokenizer wrapped once for llguidance
    (about a second for a 150k vocabulary, on the first grammar request)."""

    def __init__(self, tokenizer_dir: Path | str, vocab_size: int):
        self.tokenizer_dir = Path(tokenizer_dir)
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._hf_tokenizer = None
        self._ll_tokenizers: dict[tuple[int, ...], object] = {}

    def _ll_tokenizer(self, stop_token_ids: tuple[int, ...]):
        import llguidance.hf

        with self._lock:
            if stop_token_ids not in self._ll_tokenizers:
                if self._hf_tokenizer is None:
                    from workers.model.checkpoints import load_tokenizer

                    self._hf_tokenizer = load_tokenizer(self.tokenizer_dir)
                self._ll_tokenizers[stop_token_ids] = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(stop_token_ids)
                )
            return self._ll_tokenizers[stop_token_ids]

    def state(self, grammar: Grammar) -> "GrammarState":
        """A fresh state (no token generated yet); raises GrammarError."""
        import llguidance

        if not grammar.stop_token_ids:
            raise GrammarError("a grammar needs at least one stop token")
        stops = tuple(sorted(set(grammar.stop_token_ids)))
        matcher = llguidance.LLMatcher(self._ll_tokenizer(stops), compiled_grammar(grammar), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return GrammarState(matcher, self.vocab_size, stops)


class GrammarState:
    """One request's position in its grammar, over the tokens it generated."""

    def __init__(self, matcher, vocab_size: int, stop_token_ids: Sequence[int]):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._words = bitmask_words(vocab_size)
        self._stop_token_ids = frozenset(stop_token_ids)
        self._stop_mask = torch.zeros(self._words, dtype=torch.int32)
        for token in stop_token_ids:
            self._stop_mask[token // 32] |= _signed_bit(token % 32)
        self._num_matched = 0  # tokens fed to the matcher
        self.num_tokens = 0  # tokens appended (those past the grammar's end are not fed)

    # -- state ------------------------------------------------------------------------

    def append(self, tokens: Sequence[int]) -> None:
        """Advance by tokens the grammar allowed (raises GrammarError for one it does not)."""
        for token in tokens:
            if self._num_matched == self.num_tokens and not self._matcher.is_stopped():
                # checked first: a matcher that consumes a forbidden token stays in error for good
                if self._matcher.validate_tokens([int(token)]) != 1 or not self._matcher.consume_token(int(token)):
                    raise GrammarError(f"token {token} is not allowed after {self.num_tokens} tokens")
                self._num_matched += 1
            elif token not in self._stop_token_ids:  # past the grammar's end only a stop token may come
                raise GrammarError(f"token {token} is not allowed after the end of the grammar")
            self.num_tokens += 1

    def truncate(self, num_tokens: int) -> None:
        """Forget the tokens after the first `num_tokens` (a rollback)."""
        if num_tokens > self.num_tokens or num_tokens < 0:
            raise ValueError(f"cannot truncate {self.num_tokens} tokens to {num_tokens}")
        if num_tokens < self._num_matched:
            if not self._matcher.rollback(self._num_matched - num_tokens):
                raise GrammarError(f"rollback failed: {self._matcher.get_error()}")
            self._num_matched = num_tokens
        self.num_tokens = num_tokens

    # -- masks ------------------------------------------------------------------------

    def _fill(self, row: Tensor) -> None:
        if self._num_matched < self.num_tokens or self._matcher.is_stopped():
            row.copy_(self._stop_mask)
        else:
            self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def next_mask(self) -> Tensor:
        """[1, W] bitmask of the tokens allowed next."""
        bitmask = torch.empty(1, self._words, dtype=torch.int32)
        self._fill(bitmask[0])
        return bitmask

    def mask_rows(self, drafts: Sequence[int]) -> Tensor:
        """[len(drafts)+1, W]: row i allows what may follow the state advanced by drafts[:i].

        Rows after the first draft the grammar forbids allow everything: the
        acceptance rule rejects that draft (its masked probability is 0), so
        no later row is used. The state is left where it was."""
        bitmask = torch.full((len(drafts) + 1, self._words), -1, dtype=torch.int32)
        start = self.num_tokens
        try:
            for i in range(len(drafts) + 1):
                self._fill(bitmask[i])
                if i == len(drafts) or not _allows(bitmask[i], drafts[i]):
                    break
                self.append([drafts[i]])
        finally:
            self.truncate(start)
        return bitmask


def _allows(row: Tensor, token: int) -> bool:
    return 0 <= token < 32 * row.numel() and bool((int(row[token // 32]) >> (token % 32)) & 1)


def _signed_bit(bit: int) -> int:
    """Bit `bit` of an int32 word as a Python int that fits int32 (bit 31 is negative)."""
    return -(2**31) if bit == 31 else 1 << bit


def mask_logits(state: GrammarState | None, logits: Tensor, drafts: Sequence[int] = (), raw: Tensor | None = None) -> Tensor:
    """The grammar stage of a verification: `logits` [k+1, V] (the processed scores)
    masked row by row; a copy (the raw logits still serve logprobs). No state: unchanged.

    The grammar wins over the processors: a row where every token the grammar allows
    was forbidden by an earlier stage (min_tokens holds back the stop tokens of a
    finished document) takes the grammar's tokens over the `raw` logits instead."""
    if state is None:
        return logits
    bitmask = state.mask_rows(drafts)
    masked = apply_bitmask(logits, bitmask)
    if raw is not None:
        dead = ~(masked.amax(dim=-1) > float("-inf"))
        if bool(dead.any()):
            masked[dead] = apply_bitmask(raw[dead], bitmask[dead])
    return masked


def draft_scores(state: GrammarState | None, logits: Tensor, raw: Tensor | None = None) -> Tensor:
    """The grammar stage of a draft step: the last row of `logits` (processed) masked
    ([1, V]). Where the mask leaves no finite score, the grammar wins as in mask_logits
    (the `raw` row masked); where that too has none (a reduced head), uniform over the
    allowed tokens."""
    row = logits[-1:]
    if state is None:
        return row
    bitmask = state.next_mask()
    masked = apply_bitmask(row, bitmask)
    if raw is not None and not bool(masked.amax() > float("-inf")):  # one pass (logits are never +inf or NaN)
        masked = apply_bitmask(raw[-1:], bitmask)
    if not bool(masked.amax() > float("-inf")):
        masked = apply_bitmask(torch.zeros_like(masked), bitmask)
    return masked
