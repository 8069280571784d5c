"""Speculation that adapts to load: how many drafts each request verifies in a step.

A step's worth is the tokens it emits over the time it takes. Drafts raise the
tokens (a round verifying k drafts with per-token acceptance a emits
(1 - a^(k+1)) / (1 - a) tokens on average) and the time (k more rows in the
target's pass; in a synchronous mode also k serial draft passes; with the draft
beside the target, the step lasts at least as long as the draft's passes for it
at the pace the draft has kept). Under load
the target's pass is already wide, extra rows stop being free, and the best k
falls, down to none. This module is pure bookkeeping and arithmetic (no
torch, no clocks): the engine feeds it what it measures and asks it for a plan.

- `expected_tokens`, `plan`: the math. `plan` starts every request at its floor
  and adds drafts one at a time, best expected gain first (the gain of a k-th
  draft is a^k, falling in k), keeping the prefix of additions whose emitted
  tokens per second of the step is highest (SmartSpec's goodput, per request).
- `AcceptanceEstimate`: per-token acceptance from rounds, discounted (an EMA).
  A round that accepted n of k drafts saw n successes and, if n < k, one
  failure; n / k would underestimate a (k = 4, a = 0.5 gives 0.23).
- `CostCurve`: a cost measured online as a function of a count (the target's
  step by the tokens in its pass; a draft pass by the tokens it feeds), an EMA per count,
  made non-decreasing (noise must not make more work look cheaper), interpolated
  between counts seen and pessimistic outside them (fewer cost no less; more cost
  proportionally more), unless it follows another curve's shape where that one
  was measured (a draft pass grows and falls with the tokens it feeds as the
  target's pass does), so that it never invents a saving.
- `SpeculationPolicy`: the state the engine keeps: estimates per request, a
  global one that new requests start from, the two cost curves, a draft's pace
  (beside the target: the seconds of all its passes over those the plan counts
  for the drafts verified), and probing: a request held at k = 0 for
  PROBE_ROUNDS rounds gets a draft again, so its acceptance estimate (and the
  cost curve around the current step) do not freeze; not while even drafts
  always accepted would not pay, and with a serial draft all such requests
  together (see SpeculationPolicy._probe). With a target that borrows the
  draft's cores, a step without drafts runs wide (on both), and the plan takes
  it where its rate is at least the best drafting plan's.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, replace
from typing import Callable

EMA_WEIGHT = 0.2  # weight of a new measurement in a cost curve's value at its count
ACCEPTANCE_DECAY = 0.9  # per round: how much of a request's acceptance evidence is kept
PRIOR_TRIALS = 4.0  # weight (in draft trials) of the global estimate in a new request's
PROBE_ROUNDS = 16  # rounds at k = 0 (held there by the plan) before a request drafts again
PACE_DRAFTS = 32  # verified drafts a measurement of a beside draft's pace spans
WAIT_STEPS = 8  # steps a round may wait for a draft beside the target to feed what it missed
FIRST_DRAFTS = 16  # verified drafts before the plans begin (until then every round takes its cap)
WAIT_CLIP = 2.0  # one wait moves a serial draft pass's cost toward at most this multiple of it
TIMED_BATCHES = (1, 4, 16)  # requests in the passes timed at start-up (and the batch limit)


def timed_batches(max_batch_size: int) -> list[int]:
    """Requests in each pass the verify and draft workers time at start-up to seed the costs."""
    return sorted({b for b in TIMED_BATCHES if b < max_batch_size} | {max_batch_size})


def expected_tokens(a: float, k: int) -> float:
    """Expected tokens a round emits verifying k drafts of per-token acceptance a (the
    accepted drafts and the correction or bonus token)."""
    if k == 0:
        return 1.0
    return k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class Candidate:
    """One request's round in the next step."""

    acceptance: float  # per-token acceptance estimate
    cap: int  # most drafts (the server's k, the request's own, its remaining tokens)
    floor: int = 0  # fewest drafts (<= cap): a probe's
    # tokens the draft feeds before its first draft (what it missed at k = 0); beside the
    # target, per round of the rest of the request (SpeculationPolicy._spread_lag)
    lag: float = 0.0


def plan(
    candidates: list[Candidate],
    base_tokens: int,
    target_cost: Callable[[int], float],
    draft_pass_cost: Callable[[int], float] | None = None,
    beside: float | None = None,
) -> list[int]:
    """Drafts per candidate maximizing expected emitted tokens per second of the step
    (best_plan's drafts)."""
    return best_plan(candidates, base_tokens, target_cost, draft_pass_cost, beside)[0]


def best_plan(
    candidates: list[Candidate],
    base_tokens: int,
    target_cost: Callable[[int], float],
    draft_pass_cost: Callable[[int], float] | None = None,
    beside: float | None = None,
) -> tuple[list[int], float]:
    """Drafts per candidate maximizing expected emitted tokens per second of the step, and
    that rate.

    base_tokens: tokens in the target's pass besides the drafts (each round's
    pending token, prefill chunks). target_cost(n): seconds of a step whose pass
    has n tokens. draft_pass_cost(n): seconds of one draft pass feeding n tokens,
    paid serially before the step (a synchronous draft: the j-th draft of every
    request with k >= j comes from one batched pass, which feeds one token for
    each, and for its first draft also the candidate's lag), paid serially before
    the step (a synchronous draft); or, with `beside` (a draft running beside the
    target), the step takes the longer of the target's pass and the draft's passes
    for it times `beside` (what the draft spends per such pass: SpeculationPolicy.pace).
    None: the draft costs the step nothing.

    Drafts are added best expected gain first, which does not see a lag: a lagging
    candidate's first draft may come early, dip the rate, and hide a better plan
    among the others; so with a serial draft the plan where lagging candidates stay
    at their floors is tried too.
    """
    ks, best = _greedy(candidates, base_tokens, target_cost, draft_pass_cost, beside)
    if draft_pass_cost is not None and any(c.lag and c.floor < c.cap for c in candidates):
        fresh = [replace(c, cap=c.floor) if c.lag else c for c in candidates]
        fresh_ks, fresh_rate = _greedy(fresh, base_tokens, target_cost, draft_pass_cost, beside)
        if fresh_rate > best:
            ks, best = fresh_ks, fresh_rate
    return ks, best


def _greedy(
    candidates: list[Candidate],
    base_tokens: int,
    target_cost: Callable[[int], float],
    draft_pass_cost: Callable[[int], float] | None,
    beside: float | None,
) -> tuple[list[int], float]:
    """plan's drafts added one at a time, best gain first; the best prefix and its rate."""
    ks = [min(c.floor, c.cap) for c in candidates]
    depth: dict[int, float] = {}  # j -> tokens the j-th draft pass feeds (requests with k >= j, lags)
    for c, k in zip(candidates, ks):
        for j in range(1, k + 1):
            depth[j] = depth.get(j, 0) + _fed(c, j)

    def draft_time() -> float:
        return sum(draft_pass_cost(n) for n in depth.values()) if draft_pass_cost else 0.0

    tokens = sum(expected_tokens(c.acceptance, k) for c, k in zip(candidates, ks))
    rows = base_tokens + sum(ks)
    drafted = draft_time()

    def rate() -> float:
        cost = target_cost(rows) + drafted if beside is None else max(target_cost(rows), beside * drafted)
        return tokens / cost if cost > 0 else float("inf")

    best_rate, best_len = rate(), 0
    additions: list[int] = []  # candidate indices, in the order drafts were added
    # best gain first; of equal gains, the draft that feeds the fewest tokens
    heap = [(-_gain(c, k), _fed(c, k + 1), i) for i, (c, k) in enumerate(zip(candidates, ks)) if k < c.cap]
    heapq.heapify(heap)
    while heap:
        _, fed, i = heapq.heappop(heap)
        c = candidates[i]
        tokens += _gain(c, ks[i])
        ks[i] += 1
        rows += 1
        if draft_pass_cost is not None:
            before = depth.get(ks[i], 0)
            drafted += draft_pass_cost(before + fed) - (draft_pass_cost(before) if before else 0.0)
            depth[ks[i]] = before + fed
        additions.append(i)
        if ks[i] < c.cap:
            heapq.heappush(heap, (-_gain(c, ks[i]), _fed(c, ks[i] + 1), i))
        if (r := rate()) > best_rate:
            best_rate, best_len = r, len(additions)
    for i in additions[best_len:]:  # undo the additions past the best prefix
        ks[i] -= 1
    return ks, best_rate


def _near_its_end(r: "Round") -> bool:
    """Whether the round's cap is cut by its request's end (the tokens it may still emit)."""
    return bool(r.remaining) and r.remaining <= r.cap + 1


def _depths(drafts: list[int]) -> list[int]:
    """Requests in each draft pass behind these drafts per request: the j-th has those with >= j."""
    return [sum(1 for k in drafts if k >= j) for j in range(1, max(drafts, default=0) + 1)]


def _fed(c: Candidate, j: int) -> float:
    """Tokens the candidate's j-th draft adds to its draft pass."""
    return 1 + c.lag if j == 1 else 1


def _gain(c: Candidate, k: int) -> float:
    """Expected tokens the (k+1)-th draft adds."""
    return expected_tokens(c.acceptance, k + 1) - expected_tokens(c.acceptance, k)


class AcceptanceEstimate:
    """Per-token acceptance: discounted successes over trials."""

    def __init__(self, prior: float = 0.5, weight: float = PRIOR_TRIALS):
        self.successes = prior * weight
        self.trials = weight

    @property
    def value(self) -> float:
        return self.successes / self.trials if self.trials > 0 else 0.0

    def observe(self, drafted: int, accepted: int, decay: float = ACCEPTANCE_DECAY) -> None:
        """A round that verified `drafted` drafts and accepted the first `accepted`."""
        if drafted <= 0:
            return
        self.successes = decay * self.successes + accepted
        self.trials = decay * self.trials + accepted + (1 if accepted < drafted else 0)


class CostCurve:
    """Seconds as a function of a count, from measurements: an EMA per count, made
    non-decreasing in the count (more work never costs less: a noisy measurement
    must not invent a saving) by pooling neighbours that disagree (isotonic regression,
    each count weighted by its measurements, up to 1 / weight)."""

    def __init__(self, weight: float = EMA_WEIGHT, shape: "CostCurve | None" = None):
        """shape: a curve whose growth this one follows above the counts it has seen
        (where that curve has seen them)."""
        self.weight = weight
        self.shape = shape
        self._counts: list[int] = []  # sorted
        self._values: dict[int, float] = {}
        self._seen: dict[int, int] = {}
        self._fitted: list[float] | None = None  # non-decreasing values at _counts

    def __bool__(self) -> bool:
        return bool(self._counts)

    @property
    def counts(self) -> list[int]:
        """The counts measured, ascending."""
        return list(self._counts)

    def observe(self, count: int, seconds: float) -> None:
        if count <= 0 or seconds < 0:
            return
        if self._seen.get(count) == 1:  # the first at a count was a cold pass: replace it
            self._values[count] = seconds
        elif count in self._values:
            self._values[count] += self.weight * (seconds - self._values[count])
        else:
            bisect.insort(self._counts, count)
            self._values[count] = seconds
        self._seen[count] = self._seen.get(count, 0) + 1
        self._fitted = None

    def _fit(self) -> list[float]:
        if self._fitted is None:
            cap = 1.0 / self.weight
            self._fitted = isotonic(
                [self._values[c] for c in self._counts], [min(self._seen[c], cap) for c in self._counts]
            )
        return self._fitted

    def __call__(self, count: int) -> float:
        """Interpolated between the counts seen; above them the largest's value grown
        in proportion to the count, below them the smallest's value (never a saving not
        measured); or, outside them where the shape has been measured, the nearest
        value scaled as the shape's (above the shape's counts too: to its largest, then
        in proportion)."""
        if not self._counts:
            raise ValueError("no measurements")
        fitted = self._fit()
        i = bisect.bisect_left(self._counts, count)
        if i < len(self._counts) and self._counts[i] == count:
            return fitted[i]
        if i == 0:  # below them: as the shape falls, if it has been measured there
            high = self._counts[0]
            if self.shape and self.shape._counts and self.shape._counts[0] <= count and self.shape(high) > 0:
                return fitted[0] * self.shape(count) / self.shape(high)
            return fitted[0]
        low = self._counts[i - 1]
        if i == len(self._counts):  # above them: as the shape grows as far as it was measured,
            # then in proportion (from its own largest count alone, a draft measured at 1 token
            # priced a 56-token catch-up at 56 passes, and a request idle since its prompt,
            # longer than any target pass yet, was never probed again: sd, 1 client)
            top = min(count, self.shape._counts[-1]) if self.shape else low
            if top > low and self.shape(low) > 0:
                return fitted[-1] * self.shape(top) / self.shape(low) * count / top
            return fitted[-1] * count / low
        high = self._counts[i]
        return fitted[i - 1] + (count - low) / (high - low) * (fitted[i] - fitted[i - 1])


def isotonic(values: list[float], weights: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in weighted least squares (pool
    adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, w, n = blocks.pop()
            prev = blocks[-1]
            total = prev[1] + w
            prev[0] = (prev[0] * prev[1] + mean * w) / total
            prev[1], prev[2] = total, prev[2] + n
    return [mean for mean, _, n in blocks for _ in range(n)]


@dataclass(frozen=True)
class WideShare:
    """A wide step's time (the target on the draft's cores too) over the same step on the
    target's own cores, by the rows of its pass: measured at start-up at a few row counts
    (workers.shell.BorrowedCores.probe), linear between them, the nearest outside. One ratio
    for every step mispriced the lone request: timed on an 8-row pass (Qwen2.5-Coder-1.5B, its
    time on 2 cores over its time on 1) it was 0.47, where a 1-row pass, bound by memory more
    than by arithmetic, takes 0.68 (bench.pass_cost: 33.7 against 49.8 ms), and amusd's plans
    ran every step wide at 1 client (0.91x ar; fixed drafts 1.06x)."""

    points: tuple[tuple[int, float], ...]  # (rows, share), rows ascending

    def __call__(self, rows: int) -> float:
        i = bisect.bisect_left([n for n, _ in self.points], rows)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (n0, s0), (n1, s1) = self.points[i - 1], self.points[i]
        return s0 + (rows - n0) / (n1 - n0) * (s1 - s0)

    @property
    def lowest(self) -> float:
        return min(share for _, share in self.points)

    def __str__(self) -> str:
        return ", ".join(f"{share:.2f}x at {rows} row{'s' if rows > 1 else ''}" for rows, share in self.points)


@dataclass(frozen=True)
class Round:
    """What the engine knows of a request's next round."""

    request_id: str
    cap: int
    lag: int = 0  # verified tokens the draft has not fed (it feeds them before drafting for the request)
    remaining: int = 0  # tokens the request may still emit (0: not known)
    # a request's first round: the drafts the draft was told to make for it at admission
    # (new_request_drafts), None for a later round
    told: int | None = None


class SpeculationPolicy:
    """Estimates kept across steps, and the plan of each step.

    serial_draft: the draft's passes add to the step's time (a synchronous mode);
    otherwise the draft runs beside the target (free until it reports its passes,
    DraftPass), and a step takes the longer of the target's pass and the draft's
    passes for the step's drafts times its pace (observe_verified_drafts).
    wide_share: a target that also takes the draft's cores in steps where no request
    drafts (workers.shell.BorrowedCores): such a wide step is priced at this share of a
    step on its own cores, by its rows (measured at start-up: measured in steps under load,
    it was what else ran on the borrowed cores that time, a draft pass finishing, the server).
    """

    def __init__(self, serial_draft: bool, prior_acceptance: float = 0.5, wide_share: WideShare | None = None):
        self.serial_draft = serial_draft
        self.wide_share = wide_share
        self.target_cost = CostCurve()  # a step's seconds by the tokens in its target pass
        # a draft beside the target: the seconds of its passes over those of the passes the
        # drafts verified came from (EMA); the seconds and passes not yet set against each other
        self.pace = 1.0
        self._pass_seconds, self._planned_seconds, self._verified = 0.0, 0.0, 0
        self._paced_at = 0  # the plan the pace was last measured at
        # a draft pass's seconds by the tokens it feeds (one a request; more for one catching up)
        self.draft_cost = CostCurve(shape=self.target_cost)
        self.overall = AcceptanceEstimate(prior_acceptance)
        self._acceptance: dict[str, AcceptanceEstimate] = {}
        self._idle_rounds: dict[str, int] = {}  # rounds since the request last verified drafts
        self.last_plan: dict[str, int] = {}
        self._most_by_batch: dict[int, int] = {}  # rounds in a plan -> most drafts the latest such plan gave
        self._plans = 0  # plans made (the steps probes are aligned to)
        self.drafts_verified = 0  # in all rounds observed

    def acceptance(self, request_id: str) -> float:
        estimate = self._acceptance.get(request_id)
        return self.overall.value if estimate is None else estimate.value

    def observe_round(self, request_id: str, drafted: int, accepted: int) -> None:
        self.drafts_verified += max(0, drafted)
        if drafted <= 0:
            self._idle_rounds[request_id] = self._idle_rounds.get(request_id, 0) + 1
            return
        self._idle_rounds[request_id] = 0
        if request_id not in self._acceptance:
            self._acceptance[request_id] = AcceptanceEstimate(self.overall.value)
        self._acceptance[request_id].observe(drafted, accepted)
        self.overall.observe(drafted, accepted, decay=0.99)

    def observe_step(self, tokens: int, seconds: float) -> None:
        """A step whose target pass (on its own cores) had `tokens` tokens took `seconds`,
        without waiting for drafts (the draft's passes are priced by draft_cost)."""
        self.target_cost.observe(tokens, seconds)

    def observe_draft_pass(self, tokens: int, seconds: float) -> None:
        """A draft beside the target reported a pass feeding `tokens` tokens in `seconds`."""
        if self.serial_draft:
            return
        self.draft_cost.observe(tokens, seconds)
        self._pass_seconds += seconds

    def seed_draft_costs(self, passes: list[tuple[int, float]]) -> None:
        """A draft pass feeding one token for each of n requests took seconds, for each (n,
        seconds): timed by the draft at start-up, before any measurement of its own (each seed
        is replaced by the first measurement of its count; with a serial draft those come
        from the steps' waits)."""
        for n, seconds in passes:
            self.draft_cost.observe(n, seconds)

    def observe_verified_drafts(self, drafts: list[int]) -> None:
        """A step verified these drafts (per round) of a draft beside the target. Its pace is
        the seconds of all its passes (drafts it ran ahead and never had verified, prompts,
        passes over fewer requests than a step's) over those of the passes the plan counts
        for these drafts (one per depth), measured over spans of PACE_DRAFTS verified drafts.
        Measured, amusd, 16 clients: 5.4 s of draft passes, of a mean 6 requests each, for
        567 verified drafts; priced as passes over the step's 16 they looked free."""
        if self.serial_draft or not self.draft_cost:
            return
        self._planned_seconds += sum(self.draft_cost(n) for n in _depths(drafts))
        self._verified += sum(drafts)
        if self._verified < PACE_DRAFTS or self._planned_seconds <= 0:
            return
        pace = max(1.0, self._pass_seconds / self._planned_seconds)
        self._pass_seconds, self._planned_seconds, self._verified = 0.0, 0.0, 0
        self.pace += EMA_WEIGHT * (pace - self.pace)
        self._paced_at = self._plans

    def _forget_pace(self) -> None:
        """A pace not measured for PROBE_ROUNDS plans (no drafts verified: the plans had none)
        moves back toward 1 as a new measurement of 1 would move it: a pace measured under a
        load that has passed must not keep the draft idle for good."""
        if self._plans - self._paced_at >= PROBE_ROUNDS:
            self.pace += EMA_WEIGHT * (1.0 - self.pace)
            self._paced_at = self._plans

    def observe_draft_wait(self, rounds: list[tuple[str, int]], seconds: float) -> None:
        """A step waited `seconds` for the drafts of its rounds ((request id, k) each), before
        their outcomes are observed. The wait is split over the draft passes behind it (one
        per depth j, batch: the rounds with k >= j) in proportion to their estimated costs
        (equally at first). Not measured when a round's request did not draft in its
        previous round: the draft then also fed a prompt or tokens it missed, in an
        amount the policy knows only approximately. A pass's share moves its cost toward at
        most WAIT_CLIP times its value: one wait of ~115 ms for a round of 1 draft (the draft
        had been told 3) took a 1-request pass from 9 to 30 ms, the plans stopped drafting, and
        nothing measured it again (Qwen pair, sd, 1 client, 2 runs of 3: 26.5 tokens/s against
        32.4)."""
        if any(self._idle_rounds.get(request_id, 1) for request_id, k in rounds if k):
            return
        drafts = [k for _, k in rounds]
        batches = _depths(drafts)
        if not batches:
            return
        priced = bool(self.draft_cost)
        shares = [self.draft_cost(b) for b in batches] if priced else [1.0] * len(batches)
        total = sum(shares)
        for b, share in zip(batches, shares):
            part = seconds * share / total if total > 0 else seconds / len(batches)
            self.draft_cost.observe(b, min(part, WAIT_CLIP * share) if priced else part)

    def worth_waiting(self, lag_tokens: int, rows: int) -> bool:
        """Whether a step of `rows` target rows should wait for a draft beside the target that
        must first feed `lag_tokens` tokens: its pass feeding them takes at most WAIT_STEPS such
        steps (or its cost has not been measured yet). Not waiting is no free lunch: the target
        then moves on a token a round, and the draft, a pass behind each new prefix, keeps
        sending drafts of the prefix before (measured, amusd, 1 client: a 41-token prompt, priced
        80 ms against 17 ms steps, left requests without drafts for 8-14 rounds, some for good;
        at 2 steps 63-70 tok/s against 76-78 at fixed k, which always waits). At 16 clients a
        burst's prompts cost the draft many times more than 8 steps."""
        if not self.draft_cost or not self.target_cost:
            return True
        return self.draft_cost(lag_tokens) <= WAIT_STEPS * self.target_cost(rows)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
        self._idle_rounds.pop(request_id, None)
        self.last_plan.pop(request_id, None)

    def new_request_drafts(self, cap: int, batch: int) -> int:
        """Drafts for a request's first round, before any plan included it, in a step of
        about `batch` rounds: as many as the latest plan of the nearest number of rounds
        (the larger of two as near) gave any request; all of cap before any plan. Not the
        plan just made: a burst of requests arriving after a quiet spell would all begin
        with a quiet spell's drafts (measured, sd, 16 clients: a draft pass over 16 prompts
        on the path of the first step). Where no plan had within half or twice as many
        rounds, what a plan of `batch` such rounds would give at the overall acceptance."""
        nearest = min(self._most_by_batch, key=lambda n: (abs(n - batch), -n), default=None)
        if nearest is not None and nearest * 2 >= batch >= nearest / 2:
            return min(cap, self._most_by_batch[nearest])
        if not self._prices_plans:
            return cap
        return max(self._best([Candidate(self.overall.value, cap)] * batch, batch), default=cap)

    @property
    def _prices_plans(self) -> bool:
        """Whether costs enough to plan by have been measured, and drafts enough to estimate the
        acceptance by verified (else every round takes its cap). With the costs timed at
        start-up the first requests were planned at the prior acceptance, where drafts do not
        pay, and none ever drafted to correct it (the tiny test pair, sd)."""
        costs = bool(self.target_cost) and (bool(self.draft_cost) or not self.serial_draft)
        return costs and self.drafts_verified >= FIRST_DRAFTS

    def plan(self, rounds: list[Round], base_tokens: int) -> dict[str, int]:
        """Drafts per round of the next step (each cap until _prices_plans)."""
        self._plans += 1
        if not self.serial_draft:
            self._forget_pace()
        if not self._prices_plans:
            ks = [r.cap for r in rounds]
        else:
            # a probe only where drafts could pay: if not even drafts always accepted would
            # (a wide step; with a serial draft, counting the feeding of all a request missed,
            # on the step's path: measured, sd, 16 clients, 5.8 s of a 13 s run), a fresher
            # estimate changes no plan
            probes = [self._probe(r) for r in rounds]
            if any(probes):
                perfect = [Candidate(1.0, r.cap, lag=self._spread_lag(r, 1.0)) for r in rounds]
                if not any(self._best(perfect, base_tokens)):
                    probes = [0] * len(rounds)
            candidates = [
                Candidate(a, r.cap, max(probe, self._first_floor(r)), self._spread_lag(r, a))
                for r, probe in zip(rounds, probes)
                for a in [self.acceptance(r.request_id)]
            ]
            ks = self._best(candidates, base_tokens)
            ks = self._without_fleeting_starts(rounds, candidates, ks, base_tokens)
        self.last_plan = {r.request_id: k for r, k in zip(rounds, ks)}
        chosen = [k for r, k in zip(rounds, ks) if r.cap and not _near_its_end(r)]
        if chosen:  # rounds the plan chose for, not cut short by their requests' ends
            self._most_by_batch[len(rounds)] = max(chosen)
        return dict(self.last_plan)

    def _without_fleeting_starts(
        self, rounds: list[Round], candidates: list[Candidate], ks: list[int], base_tokens: int
    ) -> list[int]:
        """A request whose draft must first catch up (more than a round's tokens to feed) starts
        drafting only where the plan of the step's rounds alone gives it drafts too: this step's
        prefill chunks make draft rows look free, but they are gone by the steps that verify its
        drafts. Measured, amusd, 16 clients: at each arrival about ten such requests were told
        to draft, the draft fed what they missed for ~150 ms (the target kept off its core), and
        the next plan took none of their drafts."""
        starting = [k > c.floor and r.lag > r.cap for r, c, k in zip(rounds, candidates, ks)]
        if base_tokens <= len(rounds) or not any(starting):
            return ks
        steady = self._best(candidates, len(rounds))
        if all(s > c.floor for s, c, start in zip(steady, candidates, starting) if start):
            return ks
        held = [replace(c, cap=c.floor) if start and s <= c.floor else c
                for c, s, start in zip(candidates, steady, starting)]
        return self._best(held, base_tokens)

    def _first_floor(self, r: Round) -> int:
        """With a serial draft, a request's first round verifies the drafts the draft was told
        to make at admission (from the latest plan at its batch size, new_request_drafts): the
        draft has fed its prompt for them already. Planned afresh, the prompt counted as lag,
        priced whole on one step: one client then often never drafted (a coin flip on the
        measured costs: sd, 1 client, 57-63 tokens/s against 66-81 at fixed k)."""
        if not self.serial_draft or r.told is None:
            return 0
        return min(r.cap, r.told)

    def _spread_lag(self, r: Round, acceptance: float) -> float:
        """A round's lag; for a draft beside the target, spread over the rounds its request has
        left at its cap (it is fed once, and the request then drafts without it). Priced whole
        there, a new request's prompt kept the draft from ever drafting for it where wide steps
        were the other choice (measured, amusd, 1 client: 55 tokens/s against 80). A serial
        draft's lag is priced whole: spread, `sd` alone drafted again (1 client 80 tokens/s
        against 67 with it whole, the same as fixed k) but new requests under load drafted
        their prompts on the step's path (16 clients 229 against 369; 32: 191 against 364;
        spread only for requests the plan without lags gives drafts: 1 client 84, 16: 198)."""
        if self.serial_draft or not r.lag or not r.remaining or not r.cap:
            return float(r.lag)
        return r.lag / max(1.0, r.remaining / expected_tokens(acceptance, r.cap))

    def _best(self, candidates: list[Candidate], base_tokens: int) -> list[int]:
        """The best plan; with a target that borrows the draft's cores, no drafts at all where a
        wide step's rate is at least as high."""
        if self.serial_draft:
            ks, rate = best_plan(candidates, base_tokens, self.target_cost, self.draft_cost)
        else:
            ks, rate = best_plan(candidates, base_tokens, self.target_cost, self.draft_cost or None, beside=self.pace)
        if self.wide_share is not None and candidates and not any(c.floor for c in candidates):
            if len(candidates) / (self.target_cost(base_tokens) * self.wide_share(base_tokens)) >= rate:
                return [0] * len(candidates)
        return ks

    def _probe(self, r: Round) -> int:
        """1 for a request held at 0 drafts for PROBE_ROUNDS rounds; none with a target that
        borrows the draft's cores (its draft does not catch up while they are lent, so a probe
        waits for it to feed all a request missed: measured, amusd, 16 clients, most of 1.5 s
        of waits in a 6.6 s run; its pace decays instead, see _forget_pace). With a serial
        draft the probes of all such requests fall on the same step (every PROBE_ROUNDS plans):
        one draft pass then serves them all, where staggered probes put a draft pass (and the
        feeding of what the request missed) on the path of nearly every step. The window is
        two plans wide: a round takes no more drafts than the draft was told after the round
        before, so a probe is planned once to tell the draft and once to verify its draft."""
        if self._idle_rounds.get(r.request_id, 0) < PROBE_ROUNDS or self.wide_share is not None:
            return 0
        if self.serial_draft and self._plans % PROBE_ROUNDS > 1:
            return 0
        return min(1, r.cap)
