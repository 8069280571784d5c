"""Adaptive speculation in the engine loops, in-process on tiny float32 models.

Whatever the plans (drafts per request per step), greedy text is the target's
own and seeded sampled text is the same run to run; a request planned without
drafts makes the draft draft nothing for it; under a load where drafts do not
pay the rounds go without them, and probes keep coming.
"""

from __future__ import annotations

import random

import pytest

from protocol.messages import BeginDrafting, DraftIdle, GenerateRequest, SamplingParams, VerifiedPrefix
from tests.unit.test_engine import PROMPTS, make_engine, models, request, run
from tests.unit.test_speculation_policy import plans_from_the_first_round
from configs.modes import mode_of
from workers.engine import DraftEngine, DraftStream, PlainDraft
from workers.engine.request import Request
from workers.engine.speculation_policy import Round, SpeculationPolicy

__all__ = ["models", "plans_from_the_first_round"]  # fixtures shared with test_engine and test_speculation_policy


class ScriptedPolicy(SpeculationPolicy):
    """Plans drawn at random up to each round's cap: decisions as varied as timing could make them."""

    def __init__(self, serial_draft: bool, seed: int):
        super().__init__(serial_draft)
        self.rng = random.Random(seed)
        self.plans: list[dict[str, int]] = []

    def plan(self, rounds: list[Round], base_tokens: int) -> dict[str, int]:
        self.last_plan = {r.request_id: self.rng.randint(0, r.cap) for r in rounds}
        self.plans.append(dict(self.last_plan))
        return dict(self.last_plan)


class FrozenPolicy(SpeculationPolicy):
    """The real policy over fixed costs: a pass of up to 4 tokens costs 1, each token more
    1 more (batching free up to 4 rows, then by the row); a draft pass 0.05. Alone,
    3 drafts ride free; at four requests none fit. Measurements are ignored: the plans
    depend on the acceptance seen only, not on this machine's timing."""

    def __init__(self, serial_draft: bool):
        super().__init__(serial_draft, prior_acceptance=0.7)
        for n in range(1, 400):
            self.target_cost.observe(n, max(1.0, n - 3.0))
        for b in range(1, 16):
            self.draft_cost.observe(b, 0.05)

    def observe_step(self, tokens: int, seconds: float) -> None:
        pass

    def observe_draft_wait(self, rounds: list[tuple[str, int]], seconds: float) -> None:
        pass


def adaptive_engine(models, mode, policy=None, max_running=4, holds_back=False):
    run_ahead = 8 if mode == "amusd" else None  # sd: the draft runs exactly k ahead
    engine = make_engine(models["target"], models["quantized"], k=4, max_running=max_running, mode=mode,
                         run_ahead=run_ahead, holds_back=holds_back)
    engine.policy = policy or SpeculationPolicy(engine.draft.wait_for_all)
    return engine


def drafts_per_round(results, request_id):
    return [o.num_draft_tokens for o in results[request_id][2]]


@pytest.mark.parametrize("mode", ["sd", "amusd"])
@pytest.mark.parametrize("policy", ["measured", "scripted", "scripted, held back"])
def test_greedy_text_is_the_targets_whatever_the_plans(models, mode, policy):
    """Catches a round verifying drafts the draft was not told to make (a stale or short
    continuation), a draft left behind by a round without drafts, a plan for one request
    applied to another, and (held back: the draft sent a request's tokens only when told to
    draft for it again) tokens lost or sent from the wrong position."""
    requests = [request(i, p) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    engine = adaptive_engine(models, mode, ScriptedPolicy(mode == "sd", seed=1) if policy != "measured" else None,
                             holds_back="held back" in policy)
    got = run(engine, requests)
    for r in requests:
        assert got[r.request_id][0] == ar[r.request_id][0], r.request_id
    used = {k for r in requests for k in drafts_per_round(got, r.request_id)}
    assert 0 in used and max(used) >= 2  # rounds with and without drafts
    if policy == "scripted":
        assert len(used) >= 4


def test_measured_pass_costs_seed_the_steps_the_plan_has_not_run(models):
    """Catches the plan left to price a step of fewer rows than any it has run as the fewest
    it has run (a burst that drafts from its first step then never learns that a step without
    drafts costs less) and a measurement that touches the requests' caches: measure_pass_costs
    times b requests of 1 and of k+1 rows (b = 1 and the batch limit here) into the policy's
    target cost, and the requests served after it get the target's own text."""
    requests = [request(i, p) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    engine = adaptive_engine(models, "sd", max_running=4)
    assert engine.measure_pass_costs() == [1, 5, 4, 20]
    cost = engine.policy.target_cost
    assert cost.counts == [1, 4, 5, 20]  # measured, not extrapolated from one count
    assert all(cost(n) > 0 for n in cost.counts)
    got = run(engine, requests)
    for r in requests:
        assert got[r.request_id][0] == ar[r.request_id][0], r.request_id


def test_the_draft_times_its_passes_for_the_plan(models):
    """Catches a draft whose start-up timing is not wired to its own passes (counts other than
    1 request and the batch limit, a pass left in a cache) or not taken by the plan."""
    draft = DraftEngine(PlainDraft(models["quantized"]), max_model_len=64, max_requests=4)
    costs = draft.measure_pass_costs()
    assert [n for n, _ in costs] == [1, 4] and all(seconds > 0 for _, seconds in costs)
    assert not draft.has_work and draft.passes == 0
    policy = SpeculationPolicy(serial_draft=True)
    policy.seed_draft_costs(costs)
    assert policy.draft_cost.counts == [1, 4]


def sampled_run(engine):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    results = run(engine, [request(i, p, max_tokens=30, sampling=sampling) for i, p in enumerate(PROMPTS[:2])])
    return {r: tokens for r, (tokens, _, _) in results.items()}, results


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_seeded_sampling_does_not_depend_on_the_plans(models, mode):
    """Seeded runs whose plans differ (rounds with no drafts, rounds with several) give the
    target's own seeded text (`ar`'s): each position's token is the winner of its race over
    the target's p, whatever was drafted. Catches a draft's proposal or a round's k that
    changes a sampled token (the coin-and-residual rule did, so it needed a draft every
    round and no bonus token while k varied)."""
    ar, _ = sampled_run(make_engine(models["target"]))
    used = set()
    for policy_seed in range(3):
        text, results = sampled_run(adaptive_engine(models, mode, ScriptedPolicy(mode == "sd", seed=policy_seed)))
        assert text == ar
        used.update(drafts_per_round(results, "r0"))
    assert 0 in used and max(used) >= 2


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_under_load_rounds_go_without_drafts_and_the_draft_idles(models, mode):
    """Four greedy requests where drafts do not pay, not even drafts always accepted: after
    their first rounds they go without drafts (no probes either: a fresher estimate would
    change no plan), the draft drafts almost nothing, and the text is the target's. Alone,
    the same request drafts in every round. A sampled request beside them goes without too
    (catches a floor of drafts kept for sampled rounds: half the draft's passes under load)."""
    requests = [request(i, p, max_tokens=40) for i, p in enumerate(PROMPTS[:3])]
    sampled = GenerateRequest("s", PROMPTS[3], 40, SamplingParams(temperature=0.8, seed=3), [])
    ar = run(make_engine(models["target"]), requests)
    engine = adaptive_engine(models, mode, FrozenPolicy(mode == "sd"))
    got = run(engine, [*requests, sampled])
    drafted_loaded = engine.draft.transport.engine.num_drafted
    for r in requests:
        assert got[r.request_id][0] == ar[r.request_id][0]
        ks = drafts_per_round(got, r.request_id)
        later = ks[2:]
        assert not any(later)
    assert not any(drafts_per_round(got, "s")[2:])
    alone = adaptive_engine(models, mode, FrozenPolicy(mode == "sd"))
    solo = run(alone, [request(0, PROMPTS[0], max_tokens=40)])
    assert solo["r0"][0] == ar["r0"][0]
    assert all(k >= 1 for k in drafts_per_round(solo, "r0")[:-1])
    # the draft worked for the first rounds and the probes, not for every round of all four
    rounds_loaded = sum(len(got[r][2]) for r in got)
    assert drafted_loaded < 2 * rounds_loaded


def test_the_draft_is_told_the_planned_drafts(models):
    """sd: the run-ahead sent to the draft after a round is that request's plan (capped by
    its remaining tokens; 0: the draft does not draft for it), and a round never takes
    more drafts than the draft was told to make (it would wait for drafts never coming)."""
    max_tokens = 30
    policy = ScriptedPolicy(True, seed=4)
    engine = adaptive_engine(models, "sd", policy)
    sent = []
    transport = engine.draft.transport
    send = transport.send
    transport.send = lambda message: (sent.append(message), send(message))
    results = run(engine, [request(0, PROMPTS[1], max_tokens=max_tokens)])
    told = [m.max_run_ahead for m in sent if hasattr(m, "max_run_ahead")]  # BeginDrafting, then a prefix per round
    outputs = results["r0"][2]
    assert len(told) == len(outputs)  # the last round sends no prefix: the request is done
    emitted = 0
    for i, output in enumerate(outputs):
        assert output.num_draft_tokens == min(told[i], policy.plans[i]["r0"])
        emitted += len(output.token_ids)
        if i + 1 < len(outputs):
            assert told[i + 1] == min(policy.plans[i]["r0"], max_tokens - emitted - 1)
    assert 0 in told[1:] and max(told) == 4


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_a_synchronous_target_pass_never_runs_beside_the_draft(models, mode):
    """sd: a target pass starts only once the draft has done all it was told (it shares the
    target's cores), even where the plan verifies fewer drafts than the draft was told to make
    (random plans) or a new request's prompt is still to feed. Catches the target computing
    beside the draft (measured, sd, 16 clients: 15-row target passes at 2.5x their cost, and
    plans that learned those costs and kept drafting). amusd's target runs beside its draft:
    it must not wait (catches the wait applied to every mode)."""
    engine = adaptive_engine(models, mode, ScriptedPolicy(mode == "sd", seed=7))
    draft = engine.draft.transport.engine
    beside = []
    forward = engine.model.forward_batch
    engine.model.forward_batch = lambda segments: beside.append(draft.has_work) or forward(segments)
    got = run(engine, [request(i, p, max_tokens=24) for i, p in enumerate(PROMPTS[:3])])
    assert len(got) == 3 and len(beside) > 10
    assert any(beside) == (mode == "amusd")


def test_the_draft_catches_up_on_a_request_without_drafts(models):
    """Told to run 0 ahead, the draft drafts nothing for the request but, with nothing else
    to do, feeds its verified tokens (all but the newest) into the cache, so drafting
    again costs one token's pass; its drafts then equal a fresh draft's. Catches a
    draft that idles forever on has_work, or one that feeds the newest token twice."""
    prompt, more = PROMPTS[1], [9, 8, 7, 6, 5]
    used = DraftEngine(PlainDraft(models["quantized"]), max_model_len=64, max_requests=1)
    used.begin(BeginDrafting("a", 0, prompt, 0, SamplingParams()))
    assert used.has_work and used.step_all() == [] and not used.has_work
    state = used._states["a"]
    assert state.cache.length == len(prompt) - 1 and used.num_drafted == 0
    used.update(VerifiedPrefix("a", 1, len(prompt), more, 0))
    assert used.step_all() == [] and state.cache.length == len(prompt + more) - 1
    used.update(VerifiedPrefix("a", 2, len(prompt + more), [], 3))
    drafted = [t for d in used.step_all() + used.step_all() + used.step_all() for t in d.token_ids]
    fresh = DraftEngine(PlainDraft(models["quantized"]), max_model_len=64, max_requests=1)
    fresh.begin(BeginDrafting("a", 0, prompt + more, 3, SamplingParams()))
    assert drafted == [t for d in fresh.step_all() + fresh.step_all() + fresh.step_all() for t in d.token_ids]
    assert len(drafted) == 3 and not used.has_work


def test_a_synchronous_draft_leaves_catching_up_to_its_next_round(models):
    """catch_up=False (sd, easyspec: the draft's passes would run during the target's): a
    request told to run 0 ahead costs the draft no pass at all, and when it drafts again the
    pass feeds everything it missed; its drafts equal a fresh draft's. Catches the idle pass
    that slowed sd's target steps under load, or missed tokens never fed."""
    prompt, more = PROMPTS[1], [9, 8, 7, 6, 5]
    model = PlainDraft(models["quantized"])
    passes = []
    real = model.forward_batch
    model.forward_batch = lambda segments: passes.append(len(segments)) or real(segments)
    used = DraftEngine(model, max_model_len=64, max_requests=1, catch_up=False)
    used.begin(BeginDrafting("a", 0, prompt, 0, SamplingParams()))
    used.update(VerifiedPrefix("a", 1, len(prompt), more, 0))
    assert not used.has_work and used.step_all() == [] and passes == []
    assert used._states["a"].cache.length == 0
    used.update(VerifiedPrefix("a", 2, len(prompt + more), [], 3))
    drafted = [t for d in used.step_all() + used.step_all() + used.step_all() for t in d.token_ids]
    fresh = DraftEngine(PlainDraft(models["quantized"]), max_model_len=64, max_requests=1)
    fresh.begin(BeginDrafting("a", 0, prompt + more, 3, SamplingParams()))
    assert drafted == [t for d in fresh.step_all() + fresh.step_all() + fresh.step_all() for t in d.token_ids]
    assert len(drafted) == 3 and len(passes) == 3


class RecordingTransport:
    def __init__(self):
        self.sent = []

    def send(self, message) -> bool:
        self.sent.append(message)
        return True

    def receive(self, timeout_s: float):
        return []


@pytest.mark.parametrize("holds_back", [False, True])
def test_a_draft_told_to_idle_gets_a_requests_tokens_when_it_drafts_again(holds_back):
    """A draft that does not catch up while idle (a synchronous one; one whose cores the target
    borrows) is told a request's verified tokens once, when it is to draft for it again, from
    where it left off: not one message a round (measured, amusd, 16 clients without drafts: 16
    messages a step to an idle draft). Catches messages not held back, and held tokens lost."""
    stream = DraftStream(RecordingTransport(), num_draft_tokens=4, max_run_ahead=8, mode=mode_of("amusd"),
                         timeout_s=1, holds_back=holds_back)
    req = Request.from_message(GenerateRequest("a", [5, 6, 7], 16, SamplingParams(), []))
    stream.on_admit(req, 0)
    for token, run_ahead in [(11, 0), (12, 0), (13, 0), (14, 4)]:
        req.output_ids.append(token)
        stream.on_verified(req, [token], run_ahead)
    prefixes = [m for m in stream.transport.sent if isinstance(m, VerifiedPrefix)]
    if holds_back:
        assert [(p.start, p.new_tokens, p.max_run_ahead) for p in prefixes] == [(3, [11, 12, 13, 14], 4)]
        assert prefixes[0].epoch == 4  # the newest: drafts the draft tags with it are current
    else:
        assert [(p.start, p.new_tokens) for p in prefixes] == [(3, [11]), (4, [12]), (5, [13]), (6, [14])]


class LagRecordingPolicy(ScriptedPolicy):
    """Random plans, recording the lag of every round planned."""

    def __init__(self, serial_draft: bool, seed: int):
        super().__init__(serial_draft, seed)
        self.lags: list[int] = []

    def plan(self, rounds: list[Round], base_tokens: int) -> dict[str, int]:
        self.lags += [r.lag for r in rounds]
        return super().plan(rounds, base_tokens)


@pytest.mark.parametrize("holds_back", [False, True])
def test_a_draft_that_does_not_catch_up_has_its_lag_priced(models, holds_back):
    """amusd: a draft that catches up while idle feeds what a request missed off the step's
    path (no lag); one that does not (its cores lent; the verifier may still have refused to
    borrow them) feeds it when it drafts again, and the plan must see that lag. Catches the
    lag keyed to the verifier's borrowing instead of to the draft's behaviour."""
    policy = LagRecordingPolicy(serial_draft=False, seed=2)
    engine = adaptive_engine(models, "amusd", policy, holds_back=holds_back)
    run(engine, [request(i, p) for i, p in enumerate(PROMPTS[:3])])
    assert engine.borrow_cores is None
    assert (max(policy.lags) > 0) == holds_back


class QueueTransport(RecordingTransport):
    """Records what the stream sends; hands it what the test queues as the draft's news."""

    def __init__(self):
        super().__init__()
        self.arrivals = []

    def receive(self, timeout_s: float):
        out, self.arrivals = self.arrivals, []
        return out


def test_a_dropped_message_does_not_leave_the_draft_busy_for_good():
    """A message the socket drops (the draft unreachable past its queue) is never heard, so no
    DraftIdle ever counts it. Counted as sent, it left the draft busy for good: a synchronous
    target then waited draft_timeout_s before every pass, a borrowing one never widened."""

    class Dropping(QueueTransport):
        drop = False

        def send(self, message) -> bool:
            return not self.drop and super().send(message)

    stream = DraftStream(Dropping(), num_draft_tokens=4, max_run_ahead=4, mode=mode_of("sd"), timeout_s=5,
                         holds_back=True)
    req = Request.from_message(GenerateRequest("a", [5, 6, 7], 16, SamplingParams(), []))
    stream.on_admit(req, 4)
    stream.transport.arrivals.append(DraftIdle(heard=1))
    assert not stream.busy()
    stream.transport.drop = True
    req.output_ids.append(11)
    stream.on_verified(req, [11], 4)  # dropped: the draft will never say it did it
    assert not stream.busy()
    stream.wait_until_idle()
    assert stream.wait_s < 1.0
    stream.transport.drop = False
    req.output_ids.append(12)
    stream.on_verified(req, [12], 4)
    assert stream.busy()
    stream.transport.arrivals.append(DraftIdle(heard=2))  # the begin and this prefix
    assert not stream.busy()


def test_the_stream_knows_when_the_draft_has_nothing_left_to_do():
    """A target borrowing the draft's cores may take them only when the draft has finished
    what it was told (DraftIdle), not merely when no request has it run ahead: measured, amusd,
    16 clients, wide steps while the draft still fed a burst's prompts took 40-180 ms for 1.4 s
    where they take 27. Catches busy never set (a core taken from a working draft), never
    cleared (no step ever wide), and cleared by a DraftIdle sent before the draft heard of new
    work (one in flight; a restarted draft's word that it has loaded)."""
    stream = DraftStream(QueueTransport(), num_draft_tokens=4, max_run_ahead=8, mode=mode_of("amusd"),
                         timeout_s=1, holds_back=True)
    assert not stream.busy()
    req = Request.from_message(GenerateRequest("a", [5, 6, 7], 16, SamplingParams(), []))
    stream.on_admit(req, 4)
    assert stream.busy()
    req.output_ids.append(11)
    stream.on_verified(req, [11], 0)  # told to stop: it may still be in a pass
    assert stream.busy()
    stream.transport.arrivals.append(DraftIdle(heard=0))  # said before it heard of "a"
    assert stream.busy()
    stream.transport.arrivals.append(DraftIdle(heard=2))
    assert not stream.busy()
    for token, run_ahead in [(12, 4), (13, 0)]:
        req.output_ids.append(token)
        stream.on_verified(req, [token], run_ahead)
        assert stream.busy()  # drafting again, then maybe still in a pass
    stream.transport.arrivals.append(DraftIdle(heard=4))
    assert not stream.busy()
    req.output_ids.append(14)
    stream.on_verified(req, [14], 0)  # held back: nothing sent, nothing to do
    stream.on_admit(Request.from_message(GenerateRequest("b", [5], 16, SamplingParams(), [])), 0)
    assert not stream.busy()  # begun with none to draft: the draft only notes it
    stream.release("a")
    assert not stream.busy()
    stream.on_admit(Request.from_message(GenerateRequest("c", [5], 16, SamplingParams(), [])), 4)
    stream.set_available(False, lambda r: 0)
    assert not stream.busy()  # a draft that is gone uses no core
    stream.set_available(True, lambda r: 4)  # a new draft process: "b" and "c" begun anew on it
    assert stream.busy()
    stream.transport.arrivals.append(DraftIdle(heard=0))  # loaded, before it heard of them
    assert stream.busy()
    stream.transport.arrivals.append(DraftIdle(heard=2))
    assert not stream.busy()
    catching_up = DraftStream(QueueTransport(), num_draft_tokens=4, max_run_ahead=8, mode=mode_of("amusd"),
                              timeout_s=1, holds_back=False)
    catching_up.on_admit(Request.from_message(GenerateRequest("d", [5, 6], 16, SamplingParams(), [])), 0)
    assert catching_up.busy()  # it feeds the prompt while it has nothing to draft


class CapPolicy(SpeculationPolicy):
    """Every round planned at its cap."""

    def plan(self, rounds: list[Round], base_tokens: int) -> dict[str, int]:
        self.last_plan = {r.request_id: r.cap for r in rounds}
        return dict(self.last_plan)


def run_with_a_frozen_draft(models, prompts, draft_pass_s: float):
    """amusd, adaptive, every round planned at its cap, over a draft frozen (drafting nothing)
    for the first 4 steps; a draft pass priced draft_pass_s a token fed, a step 1 ms. Returns
    the texts, the drafts verified, and the waits for the frozen draft (the first thaws it)."""
    frozen = {"now": True}
    engine = make_engine(models["target"], models["quantized"], k=4, mode="amusd", run_ahead=8,
                         steps=lambda: 0 if frozen["now"] else 1, holds_back=True)
    engine.policy = CapPolicy(serial_draft=False)
    for n in range(1, 64):
        engine.policy.target_cost.observe(n, 0.001)
        engine.policy.draft_cost.observe(n, draft_pass_s * n)
    local, waits = engine.draft.transport, []

    class Watched:
        send = local.send

        def receive(self, timeout_s):
            if timeout_s > 0 and frozen["now"]:
                waits.append(timeout_s)
                frozen["now"] = False  # thawed, or the round would wait out the timeout
            return local.receive(timeout_s)

    engine.draft.transport = Watched()
    requests = [request(i, p) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in requests}
    drafted = steps = 0
    while engine.has_work:
        steps += 1
        frozen["now"] = frozen["now"] and steps <= 4
        for out in engine.step():
            got[out.request_id] += out.token_ids
            drafted += out.num_draft_tokens
    return got, drafted, waits


def test_a_greedy_round_waits_for_its_draft_only_while_that_is_cheap(models):
    """amusd, adaptive: a request whose draft has more than a round's tokens to feed (its prompt)
    waits for its first drafts only where feeding them takes the draft at most two steps.
    Measured: at 16 clients rounds waiting for a burst's prompts made steps of 165-348 ms; alone,
    a round not waiting for one prompt left the request without drafts for a dozen rounds (1
    client 63 tokens/s against 78). Text is ar's either way. Catches a round that waits for a
    draft far behind, and one that never waits."""
    prompts = [PROMPTS[1], PROMPTS[3]]  # 7 and 12 tokens: more than a round's 4 drafts
    ar = run(make_engine(models["target"]), [request(i, p) for i, p in enumerate(prompts)])
    for draft_pass_s, waited in [(0.01, False), (0.00001, True)]:
        got, drafted, waits = run_with_a_frozen_draft(models, prompts, draft_pass_s)
        assert bool(waits) == waited, draft_pass_s
        assert drafted > 0
        assert all(got[f"r{i}"] == ar[f"r{i}"][0] for i in range(len(prompts)))
