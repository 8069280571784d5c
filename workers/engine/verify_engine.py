"""The verify engine: owns the truth (the verified tokens) and runs rounds.

A request first gets a prefill pass (its prompt, all but the last token, into
the target's cache), so that the draft can prefill at the same time. Then each
round: take up to k draft tokens from the DraftSource, run ONE target pass over
[last verified token, x1..xk], apply the acceptance rule, crop the target cache
to the accepted length, emit 1..k+1 tokens, tell the DraftSource the new
verified prefix. Mode `ar` is the same round with k = 0. Requests are
interleaved round-robin.

Invariant between rounds: req.cache.length == req.num_tokens - 1 (the newest
verified token has not been fed yet: it opens the next round's pass).
"""

from __future__ import annotations

import time
from collections import deque

import torch

from protocol.messages import GenerateRequest, HistogramCounts, TokenOutput
from workers.engine.draft_source import DraftSource, Proposal
from workers.engine.request import Request
from workers.sampling import (
    COIN,
    PICK,
    accept_greedy,
    accept_sampled,
    keyed_uniforms,
    logprobs_of,
    process_logits,
    warp_with,
)
from workers.sampling.grammar import GrammarError, mask_logits


# vLLM's buckets for iteration_tokens_total (tokens per engine step)
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


class RequestRejected(ValueError):
    """A request the engine cannot run (answered with RequestFailed)."""


class CachePool:
    """Reuses KV caches: one per running request, at most `size`."""

    def __init__(self, model, max_model_len: int, size: int):
        self._model = model
        self._max_model_len = max_model_len
        self._free: list = []
        self._created = 0
        self.size = size

    @property
    def available(self) -> bool:
        return bool(self._free) or self._created < self.size

    def acquire(self):
        if self._free:
            return self._free.pop()
        if self._created >= self.size:
            raise RuntimeError("no KV cache free")
        self._created += 1
        return self._model.new_cache(self._max_model_len)

    def release(self, cache) -> None:
        cache.crop(0)
        self._free.append(cache)


class VerifyEngine:
    def __init__(
        self,
        model,
        draft: DraftSource,
        *,
        max_model_len: int,
        max_running: int,
        device="cpu",
        grammars=None,
    ):
        self.model = model
        self.grammars = grammars  # a workers.sampling.grammar.Grammars, for requests with a grammar
        self.draft = draft
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.vocab_size = model.args.vocab_size
        self._caches = CachePool(model, max_model_len, max_running)
        self._waiting: deque[Request] = deque()
        self._running: deque[Request] = deque()
        self.busy_s = 0.0  # time inside target passes
        self.iteration_tokens = HistogramCounts(ITERATION_TOKENS_BUCKETS)  # per step: prompt tokens fed + emitted

    # -- queue -------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """KV token slots the running requests hold, over the slots of all the caches the pool may hold."""
        used = sum(r.cache.length for r in self._running if r.cache is not None)
        return used / (self._caches.size * self.max_model_len)

    def add(self, message: GenerateRequest) -> None:
        """Queue a request; raises RequestRejected for one that cannot run."""
        prompt = message.prompt_ids
        if not prompt:
            raise RequestRejected("empty prompt")
        if len(prompt) >= self.max_model_len:
            raise RequestRejected(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_model_len}")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise RequestRejected(f"token ids must be in [0, {self.vocab_size})")
        if message.max_tokens < (0 if message.prompt_logprobs is not None else 1):
            raise RequestRejected("max_tokens must be at least 1 (0 only with prompt logprobs)")
        if any(r.request_id == message.request_id for r in (*self._running, *self._waiting)):
            raise RequestRejected(f"duplicate request id {message.request_id}")
        request = Request.from_message(message)
        if message.sampling.grammar is not None:
            if self.grammars is None:
                raise RequestRejected("this worker runs no grammars")
            try:
                request.grammar = self.grammars.state(message.sampling.grammar)
            except GrammarError as exc:
                raise RequestRejected(f"grammar: {exc}") from None
        self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        for queue in (self._waiting, self._running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    self._free(request)
                    return True
        return False

    def abort_all(self) -> list[str]:
        ids = [r.request_id for r in (*self._running, *self._waiting)]
        for request_id in ids:
            self.abort(request_id)
        return ids

    def _admit(self) -> None:
        while self._waiting and self._caches.available:
            request = self._waiting.popleft()
            request.cache = self._caches.acquire()
            request.queue_time_s = time.monotonic() - request.arrival_time
            self._running.append(request)
            self.draft.on_admit(request, self.run_ahead(request))

    def _free(self, request: Request) -> None:
        if request.cache is not None:
            self._caches.release(request.cache)
            request.cache = None
            self.draft.release(request.request_id)

    def _num_drafts(self, request: Request, limit: int) -> int:
        """Drafts the next round can verify: they and the correction/bonus token
        must fit both the token budget and the context."""
        remaining = request.max_tokens - len(request.output_ids)
        return max(0, min(limit, remaining - 1, self.max_model_len - request.num_tokens))

    def run_ahead(self, request: Request) -> int:
        """How far the draft may run past this request's verified prefix now."""
        return self._num_drafts(request, self.draft.max_run_ahead)

    # -- rounds ------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """Run one pass (a prefill or a round) for the next running request."""
        self._admit()
        if not self._running:
            return []
        request = self._running.popleft()
        prompt_fed = max(0, len(request.prompt_ids) - request.cache.length)  # prompt tokens this pass feeds
        if request.cache.length < request.num_tokens - 1:
            self._prefill(request)
            if request.max_tokens > 0:
                self._running.appendleft(request)  # its first round comes next
                self.iteration_tokens.observe(prompt_fed - 1)  # all but the last, which opens the first round
                return []
        if request.max_tokens > 0:
            output = self._round(request)
        else:  # prompt logprobs only: nothing to generate
            output = TokenOutput(request_id=request.request_id, token_ids=[], finish_reason="length")
        self.iteration_tokens.observe(prompt_fed + len(output.token_ids))
        if request.prompt_logprobs is not None and len(request.output_ids) == len(output.token_ids):  # first output
            chosen, top = request.prompt_scores or ([], [])
            output.prompt_logprobs, output.prompt_top_logprobs = chosen, top
            request.prompt_scores = None
        if output.finish_reason is None:
            self._running.append(request)
        else:
            self._free(request)
        return [output]

    def _forward(self, tokens: list[int], cache, num_logits: int) -> torch.Tensor:
        started = time.monotonic()
        logits = self.model.forward(torch.tensor(tokens, dtype=torch.long, device=self.device), cache, num_logits)
        self.busy_s += time.monotonic() - started
        return logits

    def _prefill(self, request: Request) -> None:
        """The prompt but its last token into the cache. When the request asked for
        prompt logprobs, the same pass also yields the logits of every row: row i
        scores prompt token i+1 given tokens 0..i (no logits are computed otherwise)."""
        fed = request.tokens[request.cache.length : -1]
        wanted = request.prompt_logprobs is not None
        logits = self._forward(fed, request.cache, num_logits=len(fed) if wanted else 0)
        if wanted:
            targets = torch.tensor(request.tokens[1 : len(fed) + 1], device=logits.device)
            request.prompt_scores = _scores(logits, targets, request.prompt_logprobs)

    def _round(self, request: Request) -> TokenOutput:
        num_tokens = request.num_tokens
        k = self._num_drafts(request, self.draft.num_draft_tokens)
        proposal = self.draft.propose(request, k) if k else Proposal.empty()
        drafts = proposal.token_ids[:k]

        pending = request.tokens[request.cache.length :]
        logits = self._forward(pending + drafts, request.cache, num_logits=len(drafts) + 1)  # [k+1, V]

        draft_ids = torch.tensor(drafts, dtype=torch.long, device=self.device)
        sampling = request.sampling
        scores = process_logits(logits, request.rows(drafts), sampling)  # row i sees drafts[:i]
        scores = mask_logits(request.grammar, scores, drafts)  # row i: what the grammar allows after drafts[:i]
        if sampling.greedy:
            acceptance = accept_greedy(draft_ids, scores)
        else:
            positions = range(num_tokens, num_tokens + len(drafts) + 1)  # of x1..xk and the bonus
            target_probs = warp_with(scores, sampling)
            draft_probs = None if proposal.probs is None else proposal.probs[: len(drafts)].to(self.device)
            acceptance = accept_sampled(
                draft_ids,
                draft_probs,
                target_probs,
                keyed_uniforms(sampling.seed, COIN, positions[:-1]),
                keyed_uniforms(sampling.seed, PICK, positions),
            )
        new_tokens = acceptance.token_ids
        if drafts and acceptance.num_accepted == len(drafts) and not sampling.greedy and not self.draft.sampled_bonus:
            new_tokens = new_tokens[:-1]
        emitted, finish_reason = self._emit(request, new_tokens)
        if request.grammar is not None:
            request.grammar.append(emitted)
        request.cache.crop(request.num_tokens - 1)  # keep the invariant: the newest token opens the next pass
        if finish_reason is None:
            self.draft.on_verified(request, emitted, self.run_ahead(request))
        output = TokenOutput(
            request_id=request.request_id,
            token_ids=emitted,
            finish_reason=finish_reason,
            num_draft_tokens=len(drafts),
            num_accepted_tokens=acceptance.num_accepted,
            run_ahead=proposal.available,
        )
        if request.num_logprobs is not None:
            output.logprobs, output.top_logprobs = _scores(
                logits[: len(emitted)], torch.tensor(emitted, device=logits.device), request.num_logprobs
            )
        if request.queue_time_s is not None and len(request.output_ids) == len(emitted):
            output.queue_time_s = request.queue_time_s
        return output

    def _emit(self, request: Request, token_ids: list[int]) -> tuple[list[int], str | None]:
        """Append tokens up to the first stop condition."""
        emitted = []
        for token in token_ids:
            request.output_ids.append(token)
            emitted.append(token)
            if token in request.stop_token_ids:
                return emitted, "stop"
            if len(request.output_ids) >= request.max_tokens or request.num_tokens >= self.max_model_len:
                return emitted, "length"
        return emitted, None


# rows of logits turned into logprobs at a time: a long prompt's log-softmax stays small
SCORE_ROWS = 256


def _scores(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each row's logprob of its token and its top `num_top` (id, logprob), as plain lists."""
    chosen: list[float] = []
    top: list[list[tuple[int, float]]] = []
    for start in range(0, logits.shape[0], SCORE_ROWS):
        rows = slice(start, start + SCORE_ROWS)
        lps, top_ids, top_lps = logprobs_of(logits[rows], token_ids[rows], num_top)
        chosen += lps.tolist()
        top += [list(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_lps.tolist())]
    return chosen, top
