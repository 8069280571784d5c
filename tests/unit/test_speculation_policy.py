"""The adaptive speculation policy as pure math: expected tokens, plans, estimates, costs."""

from __future__ import annotations

import itertools
import random

import pytest

import workers.engine.speculation_policy as speculation_policy

from workers.engine.speculation_policy import (
    EMA_WEIGHT,
    PROBE_ROUNDS,
    WAIT_CLIP,
    AcceptanceEstimate,
    Candidate,
    CostCurve,
    Round,
    SpeculationPolicy,
    WideShare,
    expected_tokens,
    isotonic,
    plan,
)



@pytest.fixture(autouse=True)
def plans_from_the_first_round(monkeypatch):
    """These tests price plans from the costs and acceptance they give; the policy's wait for
    FIRST_DRAFTS verified drafts before it plans is tested on its own
    (test_speculation_policy.py::test_plans_begin_once_drafts_have_been_verified)."""
    monkeypatch.setattr(speculation_policy, "FIRST_DRAFTS", 0)

def simulated_tokens(a: float, k: int, rounds: int = 40000, seed: int = 0) -> float:
    """Mean tokens per round by simulation: drafts accepted independently with probability a."""
    rng = random.Random(seed)
    total = 0
    for _ in range(rounds):
        accepted = next((i for i in range(k) if rng.random() >= a), k)
        total += accepted + 1
    return total / rounds


@pytest.mark.parametrize("a,k", [(0.5, 2), (0.9, 4), (0.3, 1), (0.8, 0), (1.0, 3)])
def test_expected_tokens_matches_simulation(a, k):
    """Catches an off-by-one in the geometric sum, and the bonus token left out."""
    assert expected_tokens(a, k) == pytest.approx(simulated_tokens(a, k), abs=0.03)


def test_expected_tokens_closed_forms():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 4) == 5


def affine(fixed: float, per_token: float):
    return lambda n: fixed + per_token * n


def rate(candidates, ks, base, target_cost, draft_pass_cost=None):
    tokens = sum(expected_tokens(c.acceptance, k) for c, k in zip(candidates, ks))
    draft = 0.0
    if draft_pass_cost is not None:
        for j in range(1, max(ks, default=0) + 1):
            draft += draft_pass_cost(sum(1 for k in ks if k >= j))
    return tokens / (target_cost(base + sum(ks)) + draft)


def test_speculation_backs_off_under_load():
    """A pass whose cost is a fixed part plus a part per token: alone, drafts ride on the
    fixed part and pay; at 16 requests the rows dominate and the plan drafts nothing."""
    cost = affine(0.2, 0.1)
    one = plan([Candidate(0.7, 4)], 1, cost)
    many = plan([Candidate(0.7, 4)] * 16, 16, cost)
    assert one == [2]  # 4.38 tokens/s; 0 drafts: 3.33, 4: 3.96
    assert many == [0] * 16


def test_free_rows_and_a_beside_draft_always_speculate():
    """A pass that costs the same whatever its tokens (batching free) with a draft running
    beside it: every draft is worth taking."""
    assert plan([Candidate(0.6, 5), Candidate(0.2, 3)], 2, lambda n: 1.0) == [5, 3]


def test_a_serial_draft_counts():
    """The same plan with a costly serial draft pass drafts less (none when a pass costs
    more than a whole round emits)."""
    cands = [Candidate(0.8, 4)] * 4
    beside = plan(cands, 4, affine(1.0, 0.02))
    serial = plan(cands, 4, affine(1.0, 0.02), lambda b: 0.3)
    expensive = plan(cands, 4, affine(1.0, 0.02), lambda b: 5.0)
    assert sum(serial) < sum(beside) == 16
    assert expensive == [0, 0, 0, 0]


def test_a_serial_draft_pays_for_what_a_request_missed():
    """A request that ran without drafts while a synchronous draft stood by has tokens the
    draft must feed before it drafts again, on the step's path: with the same acceptance,
    the one that kept drafting gets drafts and the lagging one none (catches a plan that
    prices a catching-up draft pass like a one-token one: measured, sd, 16 clients,
    catch-up passes of 400 tokens on the step's path)."""
    draft = lambda n: 0.01 * n  # noqa: E731 (a pass by the tokens it feeds)
    fresh, lagging = Candidate(0.8, 4), Candidate(0.8, 4, lag=300)
    assert plan([fresh, fresh], 2, affine(1.0, 0.02), draft) == [4, 4]
    ks = plan([fresh, lagging], 2, affine(1.0, 0.02), draft)
    assert ks[0] == 4 and ks[1] == 0


def test_the_better_drafted_request_gets_more_drafts():
    ks = plan([Candidate(0.95, 6), Candidate(0.3, 6)], 2, affine(1.0, 0.15))
    assert ks[0] > ks[1]


def test_floor_and_cap_hold():
    """A floor (a probe's one draft) holds even where drafts do not pay; a cap is never passed."""
    ks = plan([Candidate(0.5, 4, floor=1), Candidate(0.5, 4), Candidate(0.6, 2)], 3, affine(0.1, 1.0))
    assert ks == [1, 0, 0]
    assert plan([Candidate(0.99, 2), Candidate(0.99, 0)], 2, lambda n: 1.0) == [2, 0]


@pytest.mark.parametrize("seed", range(20))
def test_plan_is_at_least_as_good_as_any_uniform_k(seed):
    """Requests of equal acceptance: the plan's rate is at least the best rate of one k for
    all (the plans vLLM and SmartSpec choose among), and no worse than brute force by
    more than a few percent. Catches a plan that stops at a local dip of the rate."""
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    a = rng.uniform(0.2, 0.98)
    cands = [Candidate(a, 4)] * n
    fixed, per_token = rng.uniform(0.1, 2.0), rng.uniform(0.01, 0.5)
    cost = lambda tokens: fixed + per_token * tokens + (0.05 * max(0, tokens - 8) ** 1.5)  # noqa: E731
    draft = (lambda b: 0.2 + 0.02 * b) if seed % 2 else None
    got = rate(cands, plan(cands, n, cost, draft), n, cost, draft)
    uniform = max(rate(cands, [k] * n, n, cost, draft) for k in range(5))
    best = max(rate(cands, list(ks), n, cost, draft) for ks in itertools.product(range(5), repeat=n))
    assert got >= uniform - 1e-12
    assert got >= 0.97 * best


def test_acceptance_estimate_is_per_token_not_per_draft():
    """Rounds of 4 drafts accepted independently with a = 0.7: successes over trials finds
    0.7; accepted / drafted would say about 0.44."""
    rng = random.Random(3)
    estimate = AcceptanceEstimate(prior=0.5)
    for _ in range(5000):
        accepted = next((i for i in range(4) if rng.random() >= 0.7), 4)
        estimate.observe(4, accepted, decay=1.0)
    assert estimate.value == pytest.approx(0.7, abs=0.02)


def test_acceptance_estimate_follows_a_change():
    estimate = AcceptanceEstimate(prior=0.9)
    for _ in range(40):
        estimate.observe(4, 0)
    assert estimate.value < 0.1
    estimate.observe(0, 0)  # a round without drafts says nothing
    assert estimate.value < 0.1


def test_cost_curve_interpolates_and_never_invents_a_saving():
    curve = CostCurve(weight=0.5)
    assert not curve
    curve.observe(4, 1.0)
    curve.observe(8, 2.0)
    assert curve(6) == pytest.approx(1.5)
    assert curve(16) == pytest.approx(4.0)  # above: proportional to the largest
    assert curve(1) == pytest.approx(1.0)  # below: no cheaper than the smallest seen
    curve.observe(8, 4.0)  # the second at a count replaces the first (a cold pass)
    assert curve(8) == pytest.approx(4.0)
    curve.observe(8, 2.0)  # then an EMA: half way to the new measurement
    assert curve(8) == pytest.approx(3.0)


def test_a_counts_cold_first_pass_is_forgotten_at_once():
    """A shape's first pass builds its kernels (measured: 595 ms for a 2-row step that then
    takes 15): kept in an EMA it priced every step of that size, and pooled every larger one,
    as many times dearer for dozens of steps. Catches the first measurement kept."""
    curve = CostCurve()
    curve.observe(16, 0.600)
    curve.observe(16, 0.025)
    assert curve(16) == pytest.approx(0.025)
    assert curve(32) == pytest.approx(0.050)


def test_cost_curve_grows_above_its_counts_as_its_shape_does():
    """A draft pass measured over 1 to 16 tokens, asked for 400 (one catching up): it grows
    as the target's pass did from 16 to 400 tokens, not 25-fold (which would never let a
    request that missed a few dozen tokens draft again); beyond the shape's largest count,
    as the shape to there, then proportional (catches the jump to proportional from the
    draft's own largest count: 50-fold at 800 where 400 costs 10-fold)."""
    target = CostCurve()
    for n, seconds in [(1, 0.010), (16, 0.020), (400, 0.200)]:
        target.observe(n, seconds)
    draft = CostCurve(shape=target)
    for n in (1, 16):
        draft.observe(n, 0.008)
    assert draft(400) == pytest.approx(0.008 * 10)
    assert draft(32) == pytest.approx(0.008 * target(32) / target(16))
    assert draft(800) == pytest.approx(0.008 * 10 * 2)  # beyond the shape's counts: then proportional
    assert [draft(n) for n in range(1, 900, 7)] == sorted(draft(n) for n in range(1, 900, 7))
    assert draft(8) == pytest.approx(0.008)  # within its own counts: its own values


def test_cost_curve_does_not_fall_with_more_work():
    """A noisy low measurement at 16 tokens (another process stole the cores at 8) does
    not make 16 tokens look cheaper than 8: the two are pooled."""
    curve = CostCurve(weight=0.5)
    for count, seconds in [(4, 1.0), (8, 3.0), (16, 2.0), (32, 5.0)]:
        curve.observe(count, seconds)
    assert curve(8) == curve(16) == pytest.approx(2.5)
    assert curve(12) == pytest.approx(2.5)
    assert [curve(n) for n in range(1, 40)] == sorted(curve(n) for n in range(1, 40))


def test_isotonic_pools_violators_by_weight():
    assert isotonic([1.0, 3.0, 2.0, 4.0], [1, 1, 1, 1]) == pytest.approx([1.0, 2.5, 2.5, 4.0])
    assert isotonic([1.0, 3.0, 2.0], [1, 3, 1]) == pytest.approx([1.0, 2.75, 2.75])
    assert isotonic([3.0, 2.0, 1.0], [1, 1, 1]) == pytest.approx([2.0, 2.0, 2.0])


def filled_policy(serial: bool, fixed=0.2, per_token=0.1, draft_pass=0.0) -> SpeculationPolicy:
    policy = SpeculationPolicy(serial_draft=serial, prior_acceptance=0.7)
    for n in range(1, 200):
        policy.observe_step(n, fixed + per_token * n)
    if serial:
        for b in range(1, 64):
            policy.draft_cost.observe(b, draft_pass)
    return policy


def test_policy_uses_caps_until_costs_are_measured():
    policy = SpeculationPolicy(serial_draft=True)
    rounds = [Round("a", 4), Round("b", 2)]
    assert policy.plan(rounds, 2) == {"a": 4, "b": 2}
    policy.observe_step(6, 1.0)
    assert policy.plan(rounds, 2) == {"a": 4, "b": 2}  # the serial draft's cost is not known yet
    policy.observe_draft_wait([("a", 4), ("b", 2)], 0.4)
    assert not policy.draft_cost  # their first rounds: the draft also prefilled their prompts
    policy.observe_round("a", 4, 4)
    policy.observe_round("b", 2, 1)
    policy.observe_draft_wait([("a", 4), ("b", 2)], 0.4)  # 4 passes: 2 of batch 2, 2 of batch 1
    assert policy.draft_cost(2) == pytest.approx(0.1) and policy.draft_cost(1) == pytest.approx(0.1)
    policy.observe_round("b", 0, 0)
    policy.observe_draft_wait([("a", 4), ("b", 2)], 4.0)  # b resumes: the draft caught up on it too
    assert policy.draft_cost(2) == pytest.approx(0.1)


def test_policy_probes_a_request_held_at_zero():
    """Under load every request is planned 0 drafts; after PROBE_ROUNDS rounds without
    drafts a request drafts one again, so its acceptance estimate does not freeze."""
    policy = filled_policy(serial=False)
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    for _ in range(PROBE_ROUNDS):
        assert set(policy.plan(rounds, 16).values()) == {0}
        for r in rounds:
            policy.observe_round(r.request_id, 0, 0)
    probed = policy.plan(rounds, 16)
    assert set(probed.values()) == {1}
    policy.observe_round("r0", 1, 0)
    policy.observe_round("r1", 1, 1)
    again = policy.plan(rounds, 16)
    assert again["r0"] == again["r1"] == 0 and again["r2"] == 1
    assert policy.acceptance("r0") < policy.acceptance("r1")


def test_policy_starts_new_requests_from_the_plans_of_as_many_rounds():
    """A new request's first round takes what the latest plan of about as many rounds gave:
    a burst of 16 arriving after a quiet spell begins without drafts where 16 rounds got
    none, not with the quiet spell's (catches starting from whatever plan came last)."""
    assert SpeculationPolicy(serial_draft=False).new_request_drafts(4, 16) == 4  # nothing measured: the cap
    policy = filled_policy(serial=False)
    # no plan yet: what a plan of as many such rounds would give
    assert policy.new_request_drafts(4, 16) == 0 and policy.new_request_drafts(4, 1) > 0
    policy.plan([Round(f"r{i}", 4) for i in range(16)], 16)
    assert policy.last_plan and set(policy.last_plan.values()) == {0}  # under load
    alone = policy.plan([Round("r0", 4)], 1)["r0"]
    assert alone > 0
    assert policy.new_request_drafts(4, 16) == policy.new_request_drafts(4, 12) == 0
    assert policy.new_request_drafts(4, 1) == policy.new_request_drafts(4, 2) == alone
    assert policy.new_request_drafts(1, 1) == 1  # never above the cap
    policy.forget("r0")
    assert "r0" not in policy.last_plan


def test_a_serial_draft_probes_every_idle_request_on_the_same_step():
    """sd: a probe's draft pass holds up the whole step, so requests that fell idle at
    different times probe together, one draft pass for all, every PROBE_ROUNDS plans.
    Catches staggered probes (a draft pass on the path of nearly every step under load)."""
    policy = filled_policy(serial=True)
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    probes = []
    for step in range(3 * PROBE_ROUNDS):
        plan = policy.plan(rounds, 16)
        probes.append(sorted(rid for rid, k in plan.items() if k))
        for r in rounds[: 1 + step % 16]:  # requests go idle at staggered steps
            policy.observe_round(r.request_id, 0, 0)
    probing = [step for step, p in enumerate(probes) if p]
    assert probing and all((step + 1) % PROBE_ROUNDS in (0, 1) for step in probing)  # plans 16, 17, 32, 33...
    assert max(len(p) for p in probes) > 1


def test_no_probe_where_feeding_what_the_requests_missed_would_not_pay():
    """Drafts always accepted would pay for requests that kept drafting, but not once the
    draft must first feed the 16 rounds' tokens each missed: with a serial draft no probe."""
    def probes(lag):
        policy = SpeculationPolicy(serial_draft=True)
        for n in range(1, 100):
            policy.target_cost.observe(n, 0.02 + 0.001 * n)
        for n in range(1, 100):
            policy.draft_cost.observe(n, 0.004 + 0.0005 * n)
        rounds = [Round(f"r{i}", 4, lag=lag) for i in range(4)]
        for r in rounds:
            policy.observe_round(r.request_id, 4, 0)  # drafting does not pay at this acceptance
        planned = []
        for _ in range(3 * PROBE_ROUNDS):
            planned.append(sum(policy.plan(rounds, 4).values()))
            for r in rounds:
                policy.observe_round(r.request_id, 0, 0)
        return planned

    assert any(probes(lag=0))
    assert not any(probes(lag=PROBE_ROUNDS * 40))


def test_no_probe_where_not_even_perfect_drafts_would_pay():
    """A step so wide that drafts accepted every time would still lower its rate: requests
    held at 0 are not probed (a probe makes the draft feed all the request missed, on the
    step's path in sd, to refresh an estimate that changes no plan)."""
    policy = SpeculationPolicy(serial_draft=True)
    for n in range(1, 200):
        policy.target_cost.observe(n, 0.01 * n)  # every row costs: a compute-bound pass
    for b in range(1, 40):
        policy.draft_cost.observe(b, 0.01 * b)
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    for _ in range(3 * PROBE_ROUNDS):
        assert set(policy.plan(rounds, 16).values()) == {0}
        for r in rounds:
            policy.observe_round(r.request_id, 0, 0)


def beside_policy(wide_share=None, draft_pass=lambda n: 0.05) -> SpeculationPolicy:
    """amusd's policy with measured costs: a step of n tokens 0.2 + 0.01 n s on the target's
    own cores, a draft pass feeding n tokens draft_pass(n) s."""
    share = None if wide_share is None else WideShare(((1, wide_share),))
    policy = SpeculationPolicy(serial_draft=False, prior_acceptance=0.9, wide_share=share)
    for n in range(1, 200):
        policy.observe_step(n, 0.2 + 0.01 * n)
        policy.observe_draft_pass(n, draft_pass(n))
    return policy


def report_passes(policy: SpeculationPolicy, k: int, passes_per_draft: int, steps: int = 100) -> None:
    """Steps of one round verifying k drafts, for each of which the draft made
    `passes_per_draft` one-token passes (drafts run ahead and never verified, say)."""
    for _ in range(steps):
        for _ in range(k * passes_per_draft):
            policy.observe_draft_pass(1, policy.draft_cost(1))
        policy.observe_verified_drafts([k])


def test_a_draft_beside_the_target_is_priced_by_its_pace():
    """amusd: a step takes the longer of the target's pass and the draft's passes for it,
    times the pace measured (all the draft's pass seconds over those the plan counts). Alone,
    4 drafts ride free while the draft keeps up; when its passes take 6x what the plan
    counts, fewer. Catches a draft beside the target priced as free however slow it is."""
    policy = beside_policy()
    assert policy.plan([Round("a", 4)], 1) == {"a": 4}
    report_passes(policy, 4, passes_per_draft=6)
    assert 5.0 < policy.pace <= 6.0
    assert 0 < policy.plan([Round("a", 4)], 1)["a"] < 4


def test_a_pace_no_longer_measured_relaxes():
    """A pace measured under a load that has passed moves back toward 1 while no drafts are
    verified (a plan that keeps the draft idle measures nothing). Catches a draft kept idle
    for good by one slow spell."""
    policy = beside_policy(wide_share=0.5)
    report_passes(policy, 4, passes_per_draft=6)
    slow = policy.pace
    for _ in range(PROBE_ROUNDS):
        policy.plan([Round("a", 4)], 1)
    assert 1.0 < policy.pace < slow
    for _ in range(40 * PROBE_ROUNDS):
        policy.plan([Round("a", 0)], 1)
    assert policy.pace == pytest.approx(1.0, abs=0.01)


def test_steps_without_drafts_run_wide_where_they_emit_more():
    """A target that borrows the draft's cores (a pass there at half the time): 16 rounds go
    without drafts, the step taking both cores; one round alone still drafts. Without the
    cores to borrow the same 16 rounds draft. Catches borrowing never chosen, or chosen
    where drafting pays."""
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    assert set(beside_policy(wide_share=0.5).plan(rounds, 16).values()) == {0}
    assert sum(beside_policy().plan(rounds, 16).values()) > 0
    assert beside_policy(wide_share=0.5).plan([Round("a", 4)], 1)["a"] > 0


def test_one_long_wait_does_not_stop_a_lone_request_drafting():
    """sd, the Qwen pair at 1 client, in its measured costs (a 1-request draft pass 9.1 ms,
    target passes 31 ms for 1 row and 75 for 4): one round of 1 draft waited ~115 ms (the draft
    had been told 3), and attributed whole it took the draft pass to 30 ms: the plans stopped
    drafting and nothing measured it again. Catches a wait that moves the draft curve without
    bound."""
    policy = SpeculationPolicy(serial_draft=True, prior_acceptance=0.82)
    for n, seconds in ((1, 0.031), (2, 0.045), (4, 0.075)):
        policy.observe_step(n, seconds)
    policy.seed_draft_costs([(1, 0.0091), (4, 0.012)])
    policy.observe_round("a", 3, 3)
    for _ in range(5):  # rounds of 3 drafts, three 1-request passes each
        policy.observe_draft_wait([("a", 3)], 3 * 0.0091)
    assert policy.plan([Round("a", 3)], 1)["a"] > 0
    policy.observe_draft_wait([("a", 1)], 0.115)
    assert policy.draft_cost(1) <= 0.0091 * (1 + EMA_WEIGHT * (WAIT_CLIP - 1)) + 1e-9
    assert policy.plan([Round("a", 3)], 1)["a"] > 0


def test_the_wide_share_is_read_at_the_rows_of_the_step():
    """Linear between the row counts timed, the nearest outside them. Catches one share for
    every step (the 8-row one priced a lone request's wide step) and an inverted interpolation."""
    share = WideShare(((1, 0.7), (8, 0.5)))
    assert share(1) == 0.7 and share(8) == 0.5
    assert share(0) == 0.7 and share(64) == 0.5
    assert share(4) == pytest.approx(0.7 - 3 / 7 * 0.2)
    assert share.lowest == 0.5
    assert str(share) == "0.70x at 1 row, 0.50x at 8 rows"


def test_a_lone_request_drafts_where_a_wide_step_of_one_row_gains_little():
    """The Qwen pair at 1 client, in its measured costs (a 1-row pass 49.8 ms on the target's
    core, 95.4 ms for 5 rows; a draft pass 16.6 ms; 80% accepted): wide steps timed at 8 rows
    (0.47) looked faster than drafting, so the plan never drafted; at the 1-row share (0.68) it
    drafts. Sixteen rounds still run wide. Catches the plan pricing a step's wide share at
    rows other than its own."""
    def policy_with(share: WideShare) -> SpeculationPolicy:
        policy = SpeculationPolicy(serial_draft=False, prior_acceptance=0.8, wide_share=share)
        for n, seconds in ((1, 0.0498), (5, 0.0954), (16, 0.2), (80, 0.9)):
            policy.observe_step(n, seconds)
        for n in (1, 16):
            policy.observe_draft_pass(n, 0.0166 * (1 + (n - 1) * 0.1))
        return policy

    one_ratio = policy_with(WideShare(((1, 0.47),)))
    by_rows = policy_with(WideShare(((1, 0.68), (8, 0.47))))
    assert one_ratio.plan([Round("a", 4)], 1)["a"] == 0
    assert by_rows.plan([Round("a", 4)], 1)["a"] > 0
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    assert set(by_rows.plan(rounds, 16).values()) == {0}


def test_a_new_requests_prompt_is_spread_over_its_rounds_beside_a_borrowing_target():
    """A borrowing amusd draft feeds a new request's prompt (its lag) before drafting for it:
    priced whole against one step, drafting never paid, and the request ran wide to the end
    (measured, 1 client: 55 tokens/s against 80). Spread over its rounds left it drafts; with
    one round left it does not."""
    policy = beside_policy(wide_share=0.7, draft_pass=lambda n: 0.02 * n)  # a pass grows with what it feeds
    assert policy.plan([Round("a", 4, lag=60, remaining=200)], 1)["a"] > 0
    assert policy.plan([Round("b", 4, lag=60, remaining=2)], 1)["b"] == 0
    # under load the same lagging rounds still run wide
    assert set(policy.plan([Round(f"c{i}", 4, lag=60, remaining=200) for i in range(16)], 16).values()) == {0}


def test_a_serial_drafts_lag_stays_whole():
    """sd: spread, new requests under load fed their prompts on the step's path (16 clients
    229 tokens/s against 369). Catches the spreading reaching a serial draft."""
    policy = filled_policy(serial=True, draft_pass=0.05)
    for n in range(1, 200):
        policy.draft_cost.observe(n, 0.05 * n)
    whole = policy.plan([Round("a", 4, lag=60, remaining=2)], 1)["a"]
    assert policy.plan([Round("b", 4, lag=60, remaining=400)], 1)["b"] == whole


def test_a_serial_drafts_first_round_keeps_the_drafts_it_was_told():
    """sd: a new request's draft was told at admission to draft (the latest plan at its batch
    size drafted) and feeds its prompt for them; planned afresh, that prompt priced whole on
    one step often gave 0, and the request never drafted (1 client: 57-63 tokens/s against
    66-81 at fixed k). Its first round keeps what it was told; a later round with the same lag
    is planned as before. Catches the told drafts dropped."""
    policy = filled_policy(serial=True)
    for n in range(1, 200):
        policy.draft_cost.observe(n, 0.05 * n)
    assert policy.plan([Round("late", 4, lag=60)], 1)["late"] == 0
    assert policy.plan([Round("first", 4, lag=60, told=3)], 1)["first"] >= 3
    assert policy.plan([Round("capped", 2, lag=60, told=3)], 1)["capped"] == 2  # never above its cap


def test_a_requests_last_rounds_do_not_set_the_next_requests_drafts():
    """A request's last rounds have little or no room for drafts (their caps cut by its end);
    recorded as the plan of one round, the next request alone began with as few, and at none
    its prompt was then priced as lag: 0 for good (sd, 1 client, 60-69 tokens/s against 71-75
    at fixed k). Catches plans at a request's end recorded for new requests."""
    policy = filled_policy(serial=False)
    drafting = policy.plan([Round("a", 4, remaining=40)], 1)["a"]
    assert drafting > 1
    policy.plan([Round("a", 1, remaining=2)], 1)
    policy.plan([Round("a", 0, remaining=1)], 1)
    assert policy.new_request_drafts(4, 1) == drafting


def test_seeded_draft_costs_price_a_lone_requests_pass_from_its_own_measurement():
    """The draft pass of one request, priced from a 14-request one scaled as the target's pass
    falls, cost 18 ms where it takes 5 (its 4-bit kernel is bound by arithmetic, the float32
    target by memory), and after a burst a lone client began without drafts, its prompt then
    priced as lag: for good (sd, 42-45 tokens/s against 65-68). Figures from that run.
    Catches the start-up timings not reaching the draft's cost curve."""
    policy = SpeculationPolicy(serial_draft=True, prior_acceptance=0.93)
    for n, seconds in [(1, 0.021), (5, 0.030), (14, 0.058)]:
        policy.observe_step(n, seconds)
    policy.draft_cost.observe(14, 0.049)
    assert policy.new_request_drafts(4, 1) == 0
    policy.seed_draft_costs([(1, 0.005), (4, 0.015), (16, 0.056)])
    assert policy.new_request_drafts(4, 1) == 4


def test_plans_begin_once_drafts_have_been_verified(monkeypatch):
    """With its costs known from the start (timed at start-up), a policy that planned at once
    planned at the prior acceptance, where drafts did not pay, and never verified a draft to
    learn better (the tiny test pair, sd, six requests: none drafted). Catches plans made
    before FIRST_DRAFTS drafts have been verified."""
    monkeypatch.setattr(speculation_policy, "FIRST_DRAFTS", 16)
    policy = filled_policy(serial=True, draft_pass=0.05)
    rounds = [Round(f"r{i}", 4) for i in range(16)]
    assert set(policy.plan(rounds, 16).values()) == {4}  # the caps: nothing verified yet
    assert policy.new_request_drafts(4, 16) == 4
    for r in rounds[:4]:
        policy.observe_round(r.request_id, 4, 1)
    assert set(policy.plan(rounds, 16).values()) == {0}  # now by the costs, under load


def test_a_prefill_chunk_does_not_start_a_lagging_requests_draft():
    """A step with prefill chunks makes draft rows nearly free, but a request whose draft must
    first catch up is verified in later steps, without them. amusd, 16 clients: each arrival
    told ~10 such requests to draft, the draft fed their lags for ~150 ms with the target off
    its core, and the next plan took none. A request whose draft is fed still takes the free
    rows. Catches drafting started from one step's prefill."""
    policy = SpeculationPolicy(serial_draft=False, prior_acceptance=0.5)
    for n in range(1, 400):
        policy.observe_step(n, 0.001 * n)  # every row costs the same: drafts pay only beside a prefill
    rounds = [Round("fed", 4), Round("lagging", 4, lag=40, remaining=200)]
    assert policy.plan(rounds, 2) == {"fed": 0, "lagging": 0}
    with_prefill = policy.plan(rounds, 2 + 200)
    assert with_prefill["fed"] > 0 and with_prefill["lagging"] == 0
