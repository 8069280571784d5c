"""The draft side: per-request continuations, rollback, one token at a time.

For each request the draft holds a continuation: the latest verified prefix it
was told about, followed by the tokens it drafted past it. `begin` starts a
request (its prompt and sampling); `update` brings a new verified prefix (a new
epoch, as the tokens added since the last one): if it agrees with the
continuation the draft keeps going (and re-publishes the drafts beyond it under
the new epoch); if it parts at position j, the model rolls the cache back to j
and drafting restarts from the verified tokens. `step_all` drafts one token for
every request below its run-ahead limit in one batched draft pass (each request
its own segment, at its own position, over its own cache); `step` drafts one
for the next such request alone. A synchronous mode sets the
limit to k per round; an asynchronous one lets the draft run ahead while the
target verifies. The model's round hooks (DraftModel) are called explicitly.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from protocol.messages import (
    BATCH_SIZE_BOUNDS,
    BeginDrafting,
    DraftTokens,
    HistogramCounts,
    ReleaseRequest,
    SamplingParams,
    VerifiedPrefix,
)
from workers.engine.draft_model import DraftModel, PlainDraft
from workers.engine.prefix_cache import KVPool, best_source, common_prefix_len, reusable_prefix
from workers.engine.speculation_policy import timed_batches
from workers.model.model import Segment
from workers.sampling import Rows, process_logits, race, warp_with
from workers.sampling.grammar import GrammarError, draft_scores

log = logging.getLogger("tandem.draft")

DraftControl = BeginDrafting | VerifiedPrefix | ReleaseRequest  # what the verifier sends the draft


@dataclass
class DraftState:
    cache: object
    sampling: SamplingParams
    num_prompt: int = 0  # sequence[:num_prompt] is the prompt
    stop_token_ids: tuple[int, ...] = ()
    epoch: int = 0
    max_run_ahead: int = 0
    verified_len: int = 0
    sequence: list[int] = field(default_factory=list)  # verified prefix + drafted tokens
    grammar: object = None  # a GrammarState over sequence[num_prompt:] when the request has a grammar
    num_prompt: int = 0

    def sync_grammar(self, common: int) -> None:
        """The sequence changed after position `common`: move the grammar state along."""
        if self.grammar is not None:
            try:
                self.grammar.truncate(min(max(common - self.num_prompt, 0), self.grammar.num_tokens))
                self.grammar.append(self.sequence[self.num_prompt + self.grammar.num_tokens :])
            except GrammarError:  # out of step with the verifier: draft on unconstrained (lossless)
                log.exception("dropping a request's grammar in the draft")
                self.grammar = None

    @property
    def num_drafted(self) -> int:
        return len(self.sequence) - self.verified_len

    @property
    def prefill_end(self) -> int:
        """The prompt's prefill covers positions [0, prefill_end): all but its last token."""
        return max(self.num_prompt - 1, 0)


class DraftEngine:
    def __init__(
        self,
        model: DraftModel,
        *,
        max_model_len: int,
        max_requests: int,
        device="cpu",
        grammars=None,
        max_batch_size: int | None = None,
        prefill_chunk: int | None = None,
        prefix_caching: bool = False,
        catch_up: bool = True,
    ):
        """prefix_caching (with a prefill_chunk): a new request takes the prompt prefix that a
        free or running cache holds, at a multiple of prefill_chunk (workers/engine/prefix_cache.py).
        catch_up: with nothing to draft, feed the verified tokens of requests told to run 0
        ahead (see _catch_up). Right when the draft runs beside the target (amusd); in a
        synchronous mode that pass would run during the target's and slow it (measured: sd,
        adaptive, 16 clients, a target step of 16 rows 95 ms instead of ~25), so there the
        next draft pass feeds what a request missed."""
        self.model = model
        self.catch_up = catch_up
        self.prefill_chunk = prefill_chunk  # step_all feeds a long prompt this many tokens a step (None: whole)
        self.grammars = grammars  # a workers.sampling.grammar.Grammars, for requests with a grammar
        self.max_model_len = max_model_len
        self.max_requests = max_requests
        self.max_batch_size = max_batch_size or max_requests
        self.device = torch.device(device)
        # drafting order: round robin; a full table evicts the oldest (it can always recompute)
        self._states: OrderedDict[str, DraftState] = OrderedDict()
        self.prefix_caching = prefix_caching and prefill_chunk is not None
        self._caches = KVPool(
            lambda: model.new_cache(max_model_len), max_requests, prefill_chunk or 1, self.prefix_caching, whole=False
        )
        self.prefix_cache_queries = 0  # prompt tokens to prefill
        self.prefix_cache_hits = 0  # of those, tokens taken from a cache instead of computed
        self.num_rollbacks = 0
        self.num_drafted = 0
        self.batch_sizes = HistogramCounts(list(BATCH_SIZE_BOUNDS))  # requests per draft pass
        self.passes = 0  # batched draft passes made (drafting and catching up)
        self.pass_tokens = 0  # tokens the latest of them fed

    # -- requests ----------------------------------------------------------

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            if not self.prefix_caching:
                self.model.after_rollback(state.cache, 0)
            self._caches.release(state.cache, state.sequence, state.num_prompt)

    def handle(self, message: DraftControl) -> DraftTokens | None:
        """A message from the verifier; returns drafts to publish, if any."""
        if isinstance(message, BeginDrafting):
            return self.begin(message)
        if isinstance(message, VerifiedPrefix):
            return self.update(message)
        self.release(message.request_id)
        return None

    def begin(self, message: BeginDrafting) -> DraftTokens | None:
        """Draft for a request from its verified tokens (again, if it is known: a new epoch)."""
        state = self._states.get(message.request_id)
        if state is None:
            if len(self._states) >= self.max_requests:
                self.release(next(iter(self._states)))
            prompt = message.tokens[: message.num_prompt_tokens]
            state = DraftState(None, message.sampling, num_prompt=message.num_prompt_tokens)
            state.cache, reused = self._caches.acquire(prompt, state.prefill_end)
            if self.prefix_caching:
                self.prefix_cache_queries += state.prefill_end
                self.prefix_cache_hits += reused
            state.sequence = list(prompt[:reused])  # what the cache holds: _adopt keeps it
            self._states[message.request_id] = state
            if message.sampling.grammar is not None and self.grammars is not None:
                try:
                    state.grammar = self.grammars.state(message.sampling.grammar)
                except GrammarError:  # drafts unconstrained: still lossless, accepted less often
                    log.exception("drafting %s without its grammar", message.request_id)
        state.sampling = message.sampling
        state.num_prompt = message.num_prompt_tokens
        state.stop_token_ids = tuple(message.stop_token_ids)
        return self._adopt(message.request_id, state, message.epoch, 0, message.tokens, message.max_run_ahead)

    def update(self, message: VerifiedPrefix) -> DraftTokens | None:
        """Adopt a new verified prefix; returns drafts still valid under it, re-tagged."""
        state = self._states.get(message.request_id)
        if state is None or message.start != state.verified_len:
            # not begun here, or a gap (a draft worker restarted): the verifier begins it again
            log.warning("ignoring the verified prefix of %s: not begun here", message.request_id)
            return None
        return self._adopt(
            message.request_id, state, message.epoch, message.start, message.new_tokens, message.max_run_ahead
        )

    def _adopt(
        self, request_id: str, state: DraftState, epoch: int, start: int, new_tokens: list[int], max_run_ahead: int
    ) -> DraftTokens | None:
        """The verified prefix is now state.sequence[:start] + new_tokens, version `epoch`."""
        state.epoch = epoch  # always: drafts are tagged with the newest epoch seen
        state.max_run_ahead = max_run_ahead
        verified_len = start + len(new_tokens)
        common = start + common_prefix_len(state.sequence[start:], new_tokens)
        if common == verified_len:  # the verifier kept to our continuation: go on
            state.verified_len = verified_len
            self.model.after_verified(state.cache, min(verified_len, state.cache.length))
            if state.num_drafted == 0:
                return None
            return DraftTokens(request_id, epoch, verified_len, state.sequence[verified_len:])
        if common < len(state.sequence):
            self.num_rollbacks += 1  # the verifier parted from our continuation at `common`
        self.model.after_rollback(state.cache, min(state.cache.length, common))
        state.sequence = state.sequence[:start] + list(new_tokens)
        state.sync_grammar(common)
        state.verified_len = verified_len
        return None

    # -- drafting ----------------------------------------------------------

    def _has_room(self, state: DraftState) -> bool:
        return state.num_drafted < state.max_run_ahead and len(state.sequence) < self.max_model_len

    def _next_state(self) -> tuple[str, DraftState] | None:
        for request_id, state in self._states.items():
            if self._has_room(state):
                self._states.move_to_end(request_id)  # round robin across requests
                return request_id, state
        return None

    def _lags(self, state: DraftState) -> bool:
        """Verified tokens not in the cache besides the newest (which a draft pass feeds), for a
        request with no room to draft: one the verifier runs without drafts (adaptive speculation)."""
        return self.catch_up and state.cache.length < state.verified_len - 1 and not self._has_room(state)

    @property
    def has_work(self) -> bool:
        return any(self._has_room(s) or self._lags(s) for s in self._states.values())

    def step(self) -> DraftTokens | None:
        """Draft one token for the next request with room to run ahead (its prompt fed whole)."""
        picked = self._next_state()
        drafted = [] if picked is None else self._draft([picked], self.prefill_chunk if self.prefix_caching else None)
        return drafted[0] if drafted else None

    def step_all(self) -> list[DraftTokens]:
        """Draft one token for every request with room to run ahead (up to max_batch_size,
        round robin), in one draft pass. A request with more than prefill_chunk tokens
        to feed (a new prompt) feeds the next chunk of them instead and drafts nothing
        this step, so a long prompt does not hold up the others' drafts. With none to
        draft for, catch up instead."""
        picked = [(rid, state) for rid, state in self._states.items() if self._has_room(state)][: self.max_batch_size]
        for request_id, _ in picked:
            self._states.move_to_end(request_id)
        if not picked:
            self._catch_up()
        return self._draft(picked, self.prefill_chunk) if picked else []

    def _share_prefixes(self, picked: list[tuple[str, DraftState]]) -> None:
        """A request still feeding its prompt copies the longest reusable prefix that another
        request's cache holds (positions before that one's prompt end were fed in chunks)."""
        for _, state in picked:
            if state.cache.length < state.prefill_end:
                others = [(s.cache, s.sequence, s.num_prompt) for s in self._states.values() if s is not state]
                source, n = best_source(others, state.sequence, state.prefill_end, self.prefill_chunk, whole=False)
                if n > state.cache.length:
                    self.prefix_cache_hits += n - state.cache.length
                    state.cache.copy_prefix(source, n)

    def _computed_by_others(self, state: DraftState, feed: list[int], fed: list[tuple[DraftState, list[int]]]) -> bool:
        """A chunk of this pass computes this request's next chunk exactly: it waits a pass and copies it."""
        end = state.cache.length + len(feed)
        return any(
            reusable_prefix(other.sequence[: other.cache.length + len(chunk)], other.num_prompt,
                            state.sequence, state.prefill_end, self.prefill_chunk, whole=False) >= end
            for other, chunk in fed
        )

    @torch.inference_mode()
    def _catch_up(self) -> None:
        """Feed the verified tokens of lagging requests into their caches (one batched pass of
        at most prefill_chunk tokens each, its logits unused) while there is nothing to draft:
        drafting for one again then costs one token's pass, not a prefill of all it missed."""
        lagging = [s for s in self._states.values() if self._lags(s)][: self.max_batch_size]
        if not lagging:
            return
        segments = [
            Segment(torch.tensor(s.sequence[s.cache.length : s.verified_len - 1][: self.prefill_chunk],
                                 dtype=torch.long, device=self.device), s.cache)
            for s in lagging
        ]
        self.model.forward_batch(segments)
        self._count_pass(sum(int(s.tokens.shape[0]) for s in segments))
        for state in lagging:  # verified tokens: the next pass opens a round (as after a prompt chunk)
            self.model.after_rollback(state.cache, state.cache.length)

    @torch.inference_mode()
    def _draft(self, picked: list[tuple[str, DraftState]], chunk: int | None) -> list[DraftTokens]:
        # feed each request what is not yet in its cache (the last token is never fed until now),
        # at most `chunk` tokens of it
        if self.prefix_caching:
            self._share_prefixes(picked)
        fed: list[tuple[DraftState, list[int]]] = []
        passing = []
        for request_id, state in picked:
            feed = state.sequence[state.cache.length :]
            feed = feed if chunk is None else feed[:chunk]
            if self.prefix_caching and self._computed_by_others(state, feed, fed):
                continue
            fed.append((state, feed))
            passing.append((request_id, state))
        if not fed:
            return []
        whole = [state.cache.length + len(feed) == len(state.sequence) for state, feed in fed]
        segments = [Segment(torch.tensor(feed, dtype=torch.long, device=self.device), state.cache) for state, feed in fed]
        logits = self.model.forward_batch(segments)
        self.batch_sizes.observe(len(segments))
        self._count_pass(sum(len(feed) for _, feed in fed))
        drafted = []
        for (request_id, state), rows, done in zip(passing, logits, whole):
            if done:
                drafted.append(self._append(request_id, state, rows))
            else:  # a prompt chunk: what follows it is verified too, so the next pass opens a round
                self.model.after_rollback(state.cache, state.cache.length)
        return drafted

    @torch.inference_mode()
    def measure_pass_costs(self) -> list[tuple[int, float]]:
        """Time passes of b requests of 1 token each (b = 1, 4, 16 and the most a pass takes;
        a cold pass first, not counted), over caches of their own: (b, seconds) each, for
        adaptive speculation's draft costs. Unseeded, the plan priced a 1-request draft pass
        from its only measurement, 14 requests (49 ms), scaled as the target's pass falls:
        18 ms where it takes 5, and a lone client after a burst often never drafted (sd,
        42-45 tokens/s against 65-68). None for the EasySpec draft (its cache keeps fuzzy
        and exact positions of its own passes)."""
        if not isinstance(self.model, PlainDraft):
            return []
        token = torch.zeros(1, dtype=torch.long, device=self.device)
        costs = []
        for i, b in enumerate(timed_batches(self.max_batch_size)):
            caches = [self.model.new_cache(1) for _ in range(b)]
            segments = [Segment(token, cache) for cache in caches]
            if i == 0:
                self.model.forward_batch(segments)
                for cache in caches:
                    self.model.after_rollback(cache, 0)
            started = time.monotonic()
            self.model.forward_batch(segments)
            costs.append((b, time.monotonic() - started))
        return costs

    def _count_pass(self, tokens: int) -> None:
        self.passes += 1
        self.pass_tokens = tokens

    def _append(self, request_id: str, state: DraftState, logits: torch.Tensor) -> DraftTokens:
        """Draw the next token from the request's last logits row and append it."""
        position = len(state.sequence)
        sampling = state.sampling
        # the target's processing, seeing this draft's own earlier drafts as the target will,
        # then the grammar's mask
        rows = Rows(state.sequence, state.num_prompt, (), state.stop_token_ids)
        scores = draft_scores(state.grammar, process_logits(logits[-1:], rows, sampling), raw=logits[-1:])  # [1, V]
        if sampling.greedy:
            token = int(scores[0].argmax())
        else:  # the position's race over q, with the noise the verifier races p with
            token = int(race(warp_with(scores, sampling), sampling.seed, position)[0])
        state.sequence.append(token)
        if state.grammar is not None:
            state.grammar.append([token])
        self.num_drafted += 1
        return DraftTokens(request_id, state.epoch, position, [token])
