"""The verify engine: owns the truth (the verified tokens) and runs rounds.

A request is first prefilled (its prompt, all but the last token, into the
target's cache), so that the draft can prefill at the same time. Then each
round: take up to k draft tokens from the DraftSource, run the target over
[last verified token, x1..xk], apply the acceptance rule, crop the target cache
to the accepted length, emit 1..k+1 tokens, tell the DraftSource the new
verified prefix. Mode `ar` is the same round with k = 0.

Continuous batching: each `step` runs ONE target pass (LlamaModel.forward_batch)
over the rounds of all running requests (up to max_batch_size, round robin;
each its own segment over its own cache) and the prefill chunks of new ones,
within max_tokens_per_step. A prompt is prefilled in chunks of prefill_chunk
tokens at fixed boundaries (multiples of the chunk), so a request's passes have
the same shapes whatever else runs: with the batch-invariant forward, each
request gets bit for bit what it gets alone. The acceptance rule runs per
request on its rows.

Invariant between rounds: req.cache.length == req.num_tokens - 1 (the newest
verified token has not been fed yet: it opens the next round's pass).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch

from protocol.messages import BATCH_SIZE_BOUNDS, GenerateRequest, HistogramCounts, TokenOutput
from workers.engine.draft_source import DraftSource, Proposal
from workers.engine.prefix_cache import KVPool, best_source, reusable_prefix
from workers.engine.request import Request
from workers.engine.speculation_policy import Round, SpeculationPolicy, WideShare, timed_batches
from workers.model.model import LlamaModel, Segment
from workers.sampling import accept_greedy, accept_sampled, logprobs_of, process_logits, warp_with
from workers.sampling.grammar import GrammarError, mask_logits


# vLLM's buckets for iteration_tokens_total (tokens per engine step)
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


@dataclass
class Scheduled:
    """One request's part of a step: a prefill chunk, or a round (its proposal and drafts)."""

    request: Request
    tokens: list[int]
    num_logits: int
    proposal: Proposal | None = None  # None: a prefill chunk
    drafts: list[int] | None = None


class CoreBorrowing(Protocol):
    """Widens the target's thread team onto the draft's cores (True) or narrows it back
    (workers.shell.BorrowedCores)."""

    wide_share: WideShare  # a pass's time on the draft's cores too over its time on the target's own, by rows

    def __call__(self, wide: bool) -> None: ...


class RequestRejected(ValueError):
    """A request the engine cannot run (answered with RequestFailed)."""


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
        max_batch_size: int | None = None,
        max_tokens_per_step: int | None = None,
        prefill_chunk: int = 512,
        prefix_caching: bool = True,
        adaptive: bool = False,
        borrow_cores: CoreBorrowing | None = None,
    ):
        """borrow_cores: steps in which the draft idles (no round takes drafts, and the draft
        was told to run none ahead for any request) run the target's pass on the draft's
        cores too."""
        self.model = model
        self.grammars = grammars  # a workers.sampling.grammar.Grammars, for requests with a grammar
        self.draft = draft
        self.max_model_len = max_model_len
        self.device = torch.device(device)
        self.vocab_size = model.args.vocab_size
        self._caches = KVPool(lambda: model.new_cache(max_model_len), max_running, prefill_chunk, prefix_caching)
        # a running request's prefix is copied between caches only where a cache is all in this process
        self._copies_prefixes = prefix_caching and isinstance(model, LlamaModel)
        self.prefix_cache_queries = 0  # prompt tokens to prefill of the requests that may reuse a prefix
        self.prefix_cache_hits = 0  # of those, tokens taken from a cache instead of computed
        self._waiting: deque[Request] = deque()
        self._running: deque[Request] = deque()
        self.max_batch_size = max_batch_size or max_running
        self.max_tokens_per_step = max_tokens_per_step or None  # None: no limit (a round always runs whole)
        self.prefill_chunk = prefill_chunk
        self.busy_s = 0.0  # time inside target passes
        self.iteration_tokens = HistogramCounts(ITERATION_TOKENS_BUCKETS)  # per step: prompt tokens fed + emitted
        self.batch_sizes = HistogramCounts(list(BATCH_SIZE_BOUNDS))  # requests per target pass
        # adaptive speculation: each step's drafts per request from measured acceptance and costs
        self.borrow_cores = borrow_cores
        self.wide_steps = 0  # steps whose pass borrowed the draft's cores
        self.policy = (
            SpeculationPolicy(draft.wait_for_all, wide_share=borrow_cores.wide_share if borrow_cores else None)
            if adaptive and draft.num_draft_tokens
            else None
        )

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
            prompt = request.prompt_ids if request.reuses_prefix and self._caches.prefix_caching else None
            request.cache, reused = self._caches.acquire(prompt, request.prefill_end)
            if prompt is not None:
                self.prefix_cache_queries += request.prefill_end
                self.prefix_cache_hits += reused
            request.queue_time_s = time.monotonic() - request.arrival_time
            self._running.append(request)
            self.draft.on_admit(request, self.run_ahead(request))

    def _free(self, request: Request) -> None:
        if request.cache is not None:
            self._caches.release(request.cache, request.tokens, request.prefill_end)
            request.cache = None
            self.draft.release(request.request_id)
            if self.policy is not None:
                self.policy.forget(request.request_id)

    def _num_drafts(self, request: Request, limit: int) -> int:
        """Drafts the next round can verify: they and the correction/bonus token
        must fit both the token budget and the context, and the request's own cap."""
        remaining = request.max_tokens - len(request.output_ids)
        if request.num_draft_tokens is not None:
            limit = min(limit, request.num_draft_tokens)
        return max(0, min(limit, remaining - 1, self.max_model_len - request.num_tokens))

    def run_ahead(self, request: Request) -> int:
        """How far the draft may run past this request's verified prefix now (kept on the
        request: its next round takes no more drafts than the draft was told to make).
        Adaptive: the planned drafts, plus the slack the mode runs ahead beyond a round's
        drafts (amusd); none for a request whose round is planned without drafts."""
        limit = self.draft.max_run_ahead
        if self.policy is not None:
            planned = request.planned_drafts
            if planned is None:  # not planned yet: its first round
                batch = min(len(self._running) + len(self._waiting), self.max_batch_size)
                planned = self.policy.new_request_drafts(self.draft.num_draft_tokens, batch)
            limit = planned + self.draft.max_run_ahead - self.draft.num_draft_tokens if planned else 0
        request.draft_run_ahead = self._num_drafts(request, limit)
        return request.draft_run_ahead

    # -- rounds ------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """Run one target pass over the rounds and prefill chunks scheduled now."""
        step_started, waited = time.monotonic(), self.draft.wait_s
        self._admit()
        outputs = self._finish_scoring_only()
        if self._copies_prefixes:
            self._share_prefixes()
        scheduled = self._schedule()
        if self.policy is not None and self.draft.wait_for_all:
            self.policy.observe_draft_wait([(s.request.request_id, len(s.drafts)) for s in scheduled if s.drafts],
                                           self.draft.wait_s - waited)
        if not scheduled:
            return outputs
        wide = self._borrow(scheduled)
        if self.draft.wait_for_all:
            self._wait_for_quiet_draft()
        # prompt tokens each item feeds (a prefill chunk; a first round's pending token)
        prompt_fed = sum(min(len(s.tokens), max(0, len(s.request.prompt_ids) - s.request.cache.length)) for s in scheduled)
        started = time.monotonic()
        logits = self.model.forward_batch(
            [Segment(torch.tensor(s.tokens, dtype=torch.long, device=self.device), s.request.cache, s.num_logits)
             for s in scheduled]
        )
        self.busy_s += time.monotonic() - started
        self.batch_sizes.observe(len(scheduled))
        for item, rows in zip(scheduled, logits):
            if item.proposal is None:  # a prefill chunk: its first round comes in a later step
                self._score_prompt(item.request, item.tokens, rows)
                continue
            output = self._accept(item.request, item.proposal, item.drafts, rows)
            self._attach_prompt_scores(item.request, output)
            if output.finish_reason is not None:
                self._running.remove(item.request)
                self._free(item.request)
            outputs.append(output)
        self.iteration_tokens.observe(prompt_fed + sum(len(o.token_ids) for o in outputs))
        if self.policy is not None:
            # the step's cost by the tokens in its pass, without waiting for drafts: the policy
            # prices the draft's passes itself (a synchronous draft's from these waits, a draft
            # beside the target's from the passes it reports: its pace)
            seconds = time.monotonic() - step_started - (self.draft.wait_s - waited)
            if not wide:
                self.policy.observe_step(sum(len(s.tokens) for s in scheduled), seconds)
            self.policy.observe_verified_drafts([len(s.drafts) for s in scheduled if s.drafts])
        return outputs

    def _borrow(self, scheduled: list[Scheduled]) -> bool:
        """Widen the target onto the draft's cores for a step in which the draft idles (narrow it
        otherwise); whether it is wide. Idles: no round verifies drafts, no request has the draft
        run ahead, and the draft said it has finished what it was told (measured, amusd, 16
        clients: wide while the draft still fed the burst's prompts, 16-row steps took 40-180 ms
        for 1.4 s, where they take 27)."""
        if self.borrow_cores is None:
            return False
        wide = (not any(s.drafts for s in scheduled) and not any(r.draft_run_ahead for r in self._running)
                and not self.draft.busy())
        self.borrow_cores(wide)
        self.wide_steps += wide
        return wide

    def _wait_for_quiet_draft(self) -> None:
        """A synchronous draft shares the target's cores: its passes must not run during the
        target's. It may still be computing what it was told after the previous round (drafts
        this step's plan left out, a new request's prompt); the pass waits until it has done.
        Measured, default pair, sd, 16 clients: in runs where the draft ran beside the target,
        a 15-row target pass took 400-460 ms instead of ~180, and the plans learned costs
        so inflated that they kept drafting (36-40 output tokens/s against 55-63)."""
        self.draft.wait_until_idle()

    def _share_prefixes(self) -> None:
        """A request still prefilling copies the longest reusable prefix of its prompt that
        another running request's cache holds beyond its own (n > 1 choices, requests that
        arrive together with the same system prompt)."""
        for request in self._running:
            if not request.reuses_prefix or request.cache.length >= request.prefill_end:
                continue
            others = [(r.cache, r.tokens, r.prefill_end) for r in self._running if r is not request]
            source, n = best_source(others, request.prompt_ids, request.prefill_end, self.prefill_chunk)
            if n > request.cache.length:
                self.prefix_cache_hits += n - request.cache.length
                request.cache.copy_prefix(source, n)

    def _computed_by_others(self, request: Request, end: int, scheduled: list[Scheduled]) -> bool:
        """Whether a prefill chunk scheduled this step computes this request's next chunk (up to
        `end`) exactly as its own would: then it waits a step and copies it (_share_prefixes)."""
        if not (self._copies_prefixes and request.reuses_prefix):
            return False
        return any(
            s.proposal is None
            and reusable_prefix(s.request.tokens[: s.request.cache.length + len(s.tokens)], s.request.prefill_end,
                                request.prompt_ids, request.prefill_end, self.prefill_chunk) >= end
            for s in scheduled
        )

    def _finish_scoring_only(self) -> list[TokenOutput]:
        """Requests for prompt logprobs only (max_tokens 0) whose prompt is all in: their one output."""
        done = [r for r in self._running if r.max_tokens == 0 and r.cache.length == r.num_tokens - 1]
        outputs = []
        for request in done:
            output = TokenOutput(request_id=request.request_id, token_ids=[], finish_reason="length")
            self._attach_prompt_scores(request, output)
            self._running.remove(request)
            self._free(request)
            outputs.append(output)
        return outputs

    def _score_prompt(self, request: Request, fed: list[int], logits: torch.Tensor) -> None:
        """A prefill chunk's rows, when the request asked for prompt logprobs: row i scores the
        prompt token after fed[i] (given all before it)."""
        if request.prompt_logprobs is None:
            return
        start = request.cache.length - len(fed)
        targets = torch.tensor(request.tokens[start + 1 : start + len(fed) + 1], device=logits.device)
        chosen, top = _scores(logits, targets, request.prompt_logprobs)
        before = request.prompt_scores or ([], [])
        request.prompt_scores = (before[0] + chosen, before[1] + top)

    @staticmethod
    def _attach_prompt_scores(request: Request, output: TokenOutput) -> None:
        if request.prompt_logprobs is not None and len(request.output_ids) == len(output.token_ids):  # first output
            chosen, top = request.prompt_scores or ([], [])
            output.prompt_logprobs, output.prompt_top_logprobs = chosen, top
            request.prompt_scores = None

    def _schedule(self) -> list[Scheduled]:
        """This step's work: the rounds of up to max_batch_size running requests (round robin),
        then prefill chunks, while the step's token budget lasts (at least one item a step).
        A round is never cut to fit: its drafts count is the same under any load."""
        picked = list(self._running)[: self.max_batch_size]
        self._running.rotate(-len(picked))  # the next step starts with the ones left out
        rounds = [r for r in picked if r.cache.length == r.num_tokens - 1 and r.max_tokens > 0]
        prefills = [r for r in picked if r.cache.length < r.num_tokens - 1]
        budget = self.max_tokens_per_step
        scheduled: list[Scheduled] = []
        caps = [self._num_drafts(request, self.draft.num_draft_tokens) for request in rounds]
        drafts = caps if self.policy is None or not rounds else self._plan(rounds, caps, prefills)
        waiting = self._rounds_that_wait(rounds, drafts, prefills)
        for request, k in zip(rounds, drafts):
            if budget is not None and scheduled and 1 + k > budget:
                break
            proposal = self.draft.propose(request, k, request.request_id in waiting) if k else Proposal.empty()
            drafts = proposal.token_ids[:k]
            pending = request.tokens[request.cache.length :]
            scheduled.append(Scheduled(request, pending + drafts, len(drafts) + 1, proposal, drafts))
            budget = None if budget is None else budget - len(pending) - k
        for request in prefills:
            chunk = self._prefill_chunk(request)
            if self._computed_by_others(request, request.cache.length + len(chunk), scheduled):
                continue
            if budget is not None and scheduled and len(chunk) > budget:
                break
            # all rows' logits only when the request asked for prompt logprobs
            scheduled.append(Scheduled(request, chunk, len(chunk) if request.prompt_logprobs is not None else 0))
            budget = None if budget is None else budget - len(chunk)
        return scheduled

    def _lag(self, request: Request) -> int:
        """Tokens the draft feeds before its next draft for the request (adaptive plans: it was
        last fed them in the request's latest round with drafts)."""
        return request.num_tokens - request.draft_fed

    def _rounds_that_wait(self, rounds: list[Request], drafts: list[int], prefills: list[Request]) -> set[str]:
        """The rounds that wait for drafts not yet arrived. With adaptive plans and the draft
        beside the target, greedy rounds whose draft has more than a round's tokens to feed first
        (a prompt; rounds without drafts) do not, where feeding them all would take the draft
        longer than several of these steps (SpeculationPolicy.worth_waiting): such a round takes
        what has arrived, maybe none, while the draft catches up beside the target. Measured,
        amusd, 16 clients: rounds waiting for a burst's prompts made steps of 165-348 ms."""
        waiting = {r.request_id for r, k in zip(rounds, drafts) if k}
        if self.policy is None or self.draft.wait_for_all:
            return waiting
        behind = [r for r, k in zip(rounds, drafts)
                  if k and self._lag(r) > self.draft.num_draft_tokens]
        if not behind:
            return waiting
        rows = sum(1 + k for k in drafts) + sum(len(self._prefill_chunk(r)) for r in prefills)
        if self.policy.worth_waiting(sum(self._lag(r) for r in behind), rows):
            return waiting
        return waiting.difference(r.request_id for r in behind)

    def _plan(self, rounds: list[Request], caps: list[int], prefills: list[Request]) -> list[int]:
        """Adaptive speculation: the policy's drafts for each round (also what the draft is
        told to make for its next round), within what the draft was told for this one."""
        base = len(rounds) + sum(len(self._prefill_chunk(r)) for r in prefills)
        plan = self.policy.plan(
            [
                Round(r.request_id, cap, lag=self._lag(r) if self._draft_lags else 0,
                      remaining=r.max_tokens - len(r.output_ids),
                      told=r.draft_run_ahead if r.planned_drafts is None else None)
                for r, cap in zip(rounds, caps)
            ],
            base,
        )
        for request in rounds:
            request.planned_drafts = plan[request.request_id]
        return [min(plan[r.request_id], r.draft_run_ahead) for r in rounds]

    @property
    def _draft_lags(self) -> bool:
        """Whether a draft resuming a request first feeds all it missed, on the step's path: a
        synchronous draft, or one beside the target that does not catch up (its cores may be
        borrowed; a draft beside the target otherwise feeds it while it has nothing to draft)."""
        return self.draft.wait_for_all or self.draft.holds_back

    def observe_draft_pass(self, tokens: int, seconds: float) -> None:
        """The draft worker made a pass feeding `tokens` tokens in `seconds` (DraftPass)."""
        if self.policy is not None:
            self.policy.observe_draft_pass(tokens, seconds)

    def seed_draft_costs(self, passes: list[tuple[int, float]]) -> None:
        """The draft worker's passes timed at start-up (DraftPassCosts): (requests, seconds)."""
        if self.policy is not None:
            self.policy.seed_draft_costs(passes)

    @torch.inference_mode()
    def measure_pass_costs(self) -> list[int]:
        """Seed the adaptive plan's step costs with timed passes (call before any request, on
        quiet cores): b requests of 1 row and of k+1 rows each, b = 1, 4, 16 and the most a
        step takes. Without them the plan knew only the counts its steps had had, and priced
        fewer rows as the fewest it had seen: a burst that drafted from its first step never
        learned what a step without drafts costs (measured, default pair, sd, 16 clients:
        15-row steps priced as the 65-row ones it ran, 0.29 s, where they take ~0.05 s, so the
        plans went on drafting). Each seed is replaced by the first step of its count. Returns
        the counts measured (none without a plan, or for a tensor-parallel target)."""
        if self.policy is None or not isinstance(self.model, LlamaModel):
            return []
        per_round = self.draft.num_draft_tokens + 1
        batches = timed_batches(self.max_batch_size)
        tokens = torch.arange(per_round, dtype=torch.long, device=self.device) % self.vocab_size
        measured = []
        for i, (b, rows) in enumerate((b, rows) for b in batches for rows in (1, per_round)):
            caches = [self.model.new_cache(per_round) for _ in range(b)]
            segments = [Segment(tokens[:rows], cache, rows) for cache in caches]
            if i == 0:  # a cold first pass (the weights' first reads) is not a cost
                self.model.forward_batch(segments)
                for cache in caches:
                    cache.crop(0)
            started = time.monotonic()
            self.model.forward_batch(segments)
            self.policy.observe_step(b * rows, time.monotonic() - started)
            measured.append(b * rows)
        return measured

    def _prefill_chunk(self, request: Request) -> list[int]:
        """The prompt's next chunk: up to the next multiple of prefill_chunk (all but the last token)."""
        start = request.cache.length
        end = min((start // self.prefill_chunk + 1) * self.prefill_chunk, request.num_tokens - 1)
        return request.tokens[start:end]

    def _accept(self, request: Request, proposal: Proposal, drafts: list[int], logits: torch.Tensor) -> TokenOutput:
        """The acceptance rule on a round's rows of the pass: logits [len(drafts) + 1, V]."""
        num_tokens = request.num_tokens
        draft_ids = torch.tensor(drafts, dtype=torch.long, device=self.device)
        sampling = request.sampling
        scores = process_logits(logits, request.rows(drafts), sampling)  # row i sees drafts[:i]
        scores = mask_logits(request.grammar, scores, drafts, raw=logits)  # row i: what the grammar allows after drafts[:i]
        if sampling.greedy:
            acceptance = accept_greedy(draft_ids, scores)
        else:  # x1 is at position num_tokens
            acceptance = accept_sampled(draft_ids, warp_with(scores, sampling), sampling.seed, num_tokens)
        emitted, finish_reason = self._emit(request, acceptance.token_ids)
        if request.grammar is not None:
            request.grammar.append(emitted)
        request.cache.crop(request.num_tokens - 1)  # keep the invariant: the newest token opens the next pass
        if self.policy is not None:
            self.policy.observe_round(request.request_id, len(drafts), acceptance.num_accepted)
            if drafts:
                request.draft_fed = request.num_tokens
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
