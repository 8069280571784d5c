"""workers/sampling/acceptance.py: the greedy rule exactly, the sampled rule statistically.

The statistical tests simulate speculative decoding over a tiny vocabulary with a
context-dependent target ``p`` and a DIFFERENT draft ``q`` (racing with the
request's noise, or greedy) and check with a chi-square test that the first
emitted token follows ``p(.)`` and the first two follow ``p(a) p(b | a)``. The
same check must reject deliberately broken rules, which shows it can fail.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from protocol.messages import SamplingParams
from tests.unit.test_processors import reference
from workers.sampling import Acceptance, Rows, accept_greedy, accept_sampled, process_logits, race, randomness, warp_with

# ---------------------------------------------------------------- greedy


def _one_hot_logits(ids, vocab=8):
    logits = torch.full((len(ids), vocab), -1.0)
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 2.0
    return logits


def test_greedy_perfect_match_accepts_all_and_adds_bonus():
    res = accept_greedy(torch.tensor([3, 1, 4]), _one_hot_logits([3, 1, 4, 5]))
    assert res == Acceptance(num_accepted=3, token_ids=[3, 1, 4, 5])


def test_greedy_early_mismatch_emits_target_argmax():
    res = accept_greedy(torch.tensor([3, 2, 4]), _one_hot_logits([3, 1, 4, 5]))
    assert res == Acceptance(num_accepted=1, token_ids=[3, 1])
    res = accept_greedy(torch.tensor([0, 1, 4]), _one_hot_logits([3, 1, 4, 5]))
    assert res == Acceptance(num_accepted=0, token_ids=[3])  # later matches do not count


def test_greedy_mismatch_at_last_draft():
    res = accept_greedy(torch.tensor([3, 1, 7]), _one_hot_logits([3, 1, 4, 5]))
    assert res == Acceptance(num_accepted=2, token_ids=[3, 1, 4])


def test_greedy_k_zero_is_argmax():
    res = accept_greedy(torch.zeros(0, dtype=torch.int64), _one_hot_logits([6]))
    assert res == Acceptance(num_accepted=0, token_ids=[6])


def test_greedy_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        accept_greedy(torch.tensor([1, 2]), _one_hot_logits([1, 2]))


# ---------------------------------------------------------------- the race (randomness.py)


def test_race_noise_is_splitmix_of_the_key_and_token():
    """The array hash is the 64-bit one bit for bit: catches a shift or a constant not taken
    as unsigned 64-bit (it would change every seeded text at once)."""
    ids = np.array([0, 1, 77, 151_935, 2**40 + 3])
    key = randomness.position_key(7, 12)
    for token, noise in zip(ids.tolist(), randomness.race_noise(7, 12, ids).tolist()):
        u = (randomness._splitmix64(key ^ token) >> 11) * (1.0 / (1 << 53))
        assert noise == pytest.approx(-math.log1p(-u), rel=1e-12)


def test_race_noise_is_exponential_and_keyed():
    noise = randomness.race_noise(3, 0, np.arange(100_000))
    assert noise.mean() == pytest.approx(1.0, abs=0.02) and noise.min() >= 0
    assert (noise > 1.0).mean() == pytest.approx(math.exp(-1), abs=0.01)
    assert not np.array_equal(noise[:100], randomness.race_noise(3, 1, np.arange(100)))  # by position
    assert not np.array_equal(noise[:100], randomness.race_noise(4, 0, np.arange(100)))  # by seed


@pytest.mark.parametrize("spread", [0.5, 3.0])
def test_race_is_argmax_over_all_tokens(spread):
    """The winner is argmax p_j / E_j over every token, where race computes E only for the
    tokens that could win: catches a candidate wrongly left out (flat and peaked rows).
    Zero-probability tokens never win."""
    p = torch.softmax(torch.randn(40, 3000, generator=torch.Generator().manual_seed(1)) * spread, -1)
    p[:, ::2] = 0.0
    winners = race(p, seed=9, first_position=40)
    assert all(w % 2 == 1 for w in winners.tolist())
    full = [int(np.argmax(p[r].double().numpy() / randomness.race_noise(9, 40 + r, np.arange(3000))))
            for r in range(40)]
    assert winners.tolist() == full


def test_race_follows_the_distribution_chi_square():
    """60,000 positions of one request racing the same p: the winners follow p, never a
    zero-probability token, and the same check rejects a slightly wrong p."""
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.3, 0.0])
    n = 60_000
    counts = torch.bincount(race(probs.expand(n, -1), seed=11, first_position=0), minlength=6).double()
    assert counts[1] == 0 and counts[5] == 0
    keep = probs > 0

    def pvalue(expected_probs):
        e = expected_probs[keep].double()
        return chisquare(counts[keep].numpy(), (e / e.sum() * n).numpy()).pvalue

    assert pvalue(probs) > 1e-3
    assert pvalue(torch.tensor([0.1, 0.0, 0.35, 0.25, 0.3, 0.0])) < 1e-6


def test_a_row_with_nothing_to_race_still_gives_a_token():
    """A draft row without a positive probability (NaN logits) gives a token instead of
    raising: catches a draft step that fails and leaves the verifier waiting draft_timeout_s
    for each such round (the inverse-CDF sampler before the race returned an index too)."""
    rows = torch.tensor([[0.0, 0.0, 0.0], [float("nan")] * 3])
    assert [0 <= t < 3 for t in race(rows, seed=1, first_position=0).tolist()] == [True, True]


# ---------------------------------------------------------------- sampled, simple cases


def test_sampled_k_zero_is_the_races_winner():
    p = torch.tensor([[0.1, 0.2, 0.7]])
    res = accept_sampled(torch.zeros(0, dtype=torch.int64), p, 5, 3)
    assert res == Acceptance(num_accepted=0, token_ids=race(p, 5, 3).tolist())


def test_sampled_token_with_zero_target_probability_is_always_rejected():
    p = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    for seed in range(50):
        res = accept_sampled(torch.tensor([0]), p, seed, 0)
        assert res.num_accepted == 0 and res.token_ids[0] in (1, 2)


def test_a_draft_racing_the_targets_own_distribution_is_always_accepted():
    """The coupling: with q == p the draft's race has the target's winner, always."""
    p = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(1)), -1)
    for seed in range(50):
        drafts = race(p[:3], seed, 10)
        res = accept_sampled(drafts, p, seed, 10)
        assert res.num_accepted == 3 and res.token_ids[:3] == drafts.tolist()


def test_the_emitted_tokens_do_not_depend_on_the_drafts():
    """Whatever the draft proposed and however many, the tokens emitted at each position are
    the target's winners there: a seeded text is the same in every mode and under every plan.
    Catches a rule that lets a rejected draft (or its q) choose the correction."""
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, 40, generator=g) * 0.5, -1)
    q = torch.softmax(torch.randn(6, 40, generator=g) * 0.5, -1)
    for seed in range(30):
        target = race(p, seed, 100).tolist()
        for k in range(6):
            for drafts in (race(q[:k], seed, 100), torch.randint(40, (k,), generator=g)):
                res = accept_sampled(drafts, p[: k + 1], seed, 100)
                assert res.token_ids == target[: res.num_accepted + 1]


def test_sampled_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        accept_sampled(torch.tensor([1]), torch.ones(1, 4) / 4, 0, 0)
    with pytest.raises(ValueError):
        accept_sampled(torch.tensor([1]), torch.ones(3, 4) / 4, 0, 0)


def test_seeded_runs_are_reproducible_and_seeds_differ():
    vocab, k = 50_000, 8
    g0 = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g0), -1)
    drafts = race(torch.softmax(torch.randn(k, vocab, generator=g0), -1), 7, 0)

    def run(seed):
        return [accept_sampled(drafts, p, seed, first) for first in range(5)]

    assert run(7) == run(7)
    assert run(7) != run(8)


# ---------------------------------------------------------------- sampled, statistical

V = 5
N_TRIALS = 10_000


class ToyLM:
    """A target p and a different draft q over V tokens, depending on all previous tokens.

    ``p[ctx]`` and ``q[ctx]`` are [V] float32 rows for every context of up to
    ``depth`` tokens. Target rows have their least likely token removed (as
    top-k = V-1 would) and a floor so every cell of the two-token joint is well
    populated; draft rows are peaky Dirichlet(0.5) draws.
    """

    def __init__(self, seed: int, depth: int):
        rng = np.random.default_rng(seed)
        contexts = [c for d in range(depth + 1) for c in itertools.product(range(V), repeat=d)]
        raw_p = rng.dirichlet(np.ones(V), size=len(contexts)) * 0.7 + 0.3 / V
        raw_p[np.arange(len(contexts)), raw_p.argmin(-1)] = 0.0
        raw_p /= raw_p.sum(-1, keepdims=True)
        raw_q = rng.dirichlet(np.full(V, 0.5), size=len(contexts))
        self.p = {c: torch.tensor(raw_p[i], dtype=torch.float32) for i, c in enumerate(contexts)}
        self.q = {c: torch.tensor(raw_q[i], dtype=torch.float32) for i, c in enumerate(contexts)}

    def joint2(self) -> np.ndarray:
        return np.array([[float(self.p[()][a]) * float(self.p[(a,)][b]) for b in range(V)] for a in range(V)])


def rule_correct(draft_ids, target_probs, seed, first_position):
    return accept_sampled(draft_ids, target_probs, seed, first_position)


def rule_accept_always(draft_ids, target_probs, seed, first_position):
    """Broken: keeps every draft (the output follows q, not p)."""
    k = draft_ids.shape[0]
    bonus = race(target_probs[k : k + 1], seed, first_position + k).item()
    return Acceptance(num_accepted=k, token_ids=draft_ids.tolist() + [bonus])


def rule_one_noise_for_every_position(draft_ids, target_probs, seed, first_position):
    """Broken, subtly: each token is a fair draw on its own, but every position races with
    the same noise, so the tokens of a text are not independent draws."""
    return accept_sampled(draft_ids, target_probs, seed, 0)


def simulate_first_two(lm: ToyLM, rule, k: int, greedy_draft: bool, n: int, seed: int, target_rows=None) -> np.ndarray:
    """Run n independent generations (request seeds seed*n .. seed*n+n-1; one round of k
    drafts, then k=1 rounds) and count the first two emitted tokens: a [V, V] count matrix.
    The draft races q with the request's noise (or takes its argmax: a greedy draft).
    target_rows(ctx, drafts) -> [k+1, V] replaces the rows of lm.p (as a verifier computes them)."""
    counts = np.zeros((V, V), dtype=np.int64)
    rows: dict = {}  # the target's rows by (context, drafts)
    for t in range(n):
        request_seed = seed * n + t
        ctx: tuple = ()
        emitted: list[int] = []
        rounds = 0
        while len(emitted) < 2:
            kk = k if rounds == 0 else 1
            drafts: tuple = ()
            for i in range(kk):
                q = lm.q[ctx + drafts]
                token = int(q.argmax()) if greedy_draft else int(race(q.view(1, -1), request_seed, len(emitted) + i)[0])
                drafts += (token,)
            if (ctx, drafts) not in rows:
                rows[ctx, drafts] = target_rows(ctx, drafts) if target_rows else torch.stack(
                    [lm.p[ctx + drafts[:i]] for i in range(len(drafts) + 1)])
            res = rule(torch.tensor(drafts, dtype=torch.int64), rows[ctx, drafts], request_seed, len(emitted))
            emitted += res.token_ids
            ctx = tuple(emitted)
            rounds += 1
        counts[emitted[0], emitted[1]] += 1
    return counts


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of counts to probs; any count on a zero-probability cell -> 0."""
    counts, probs = counts.ravel(), probs.ravel()
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    expected = probs[support].astype(np.float64)
    expected = expected / expected.sum() * counts.sum()
    assert expected.min() >= 5, "test setup: too few expected counts for chi-square"
    return float(chisquare(counts[support], expected).pvalue)


@pytest.fixture(scope="module")
def lm():
    return ToyLM(seed=1234, depth=4)


def test_toy_draft_differs_from_target(lm):
    tv = 0.5 * (lm.p[()] - lm.q[()]).abs().sum().item()
    assert tv > 0.2


@pytest.mark.parametrize("greedy_draft", [False, True], ids=["sampled_draft", "greedy_draft"])
@pytest.mark.parametrize("k", [1, 4])
def test_sampled_rule_emits_target_distribution(lm, k, greedy_draft):
    counts = simulate_first_two(lm, rule_correct, k, greedy_draft, N_TRIALS, seed=10 * k + greedy_draft)
    p_first = chi2_pvalue(counts.sum(1), lm.p[()].numpy())
    p_joint = chi2_pvalue(counts, lm.joint2())
    assert p_first > 1e-3, p_first
    assert p_joint > 1e-3, p_joint


@pytest.mark.parametrize("rule", [rule_accept_always, rule_one_noise_for_every_position])
@pytest.mark.parametrize("greedy_draft", [False, True], ids=["sampled_draft", "greedy_draft"])
def test_broken_rules_fail_the_same_check(lm, rule, greedy_draft):
    counts = simulate_first_two(lm, rule, 2, greedy_draft, N_TRIALS // 2, seed=99)
    p_first = chi2_pvalue(counts.sum(1), lm.p[()].numpy())
    p_joint = chi2_pvalue(counts, lm.joint2())
    assert min(p_first, p_joint) < 1e-6, (p_first, p_joint)


# ---------------------------------------------------------------- with the sampling controls

PROMPT = (1, 1, 3)
SHIFT = 1.5  # logits = log p + SHIFT: some positive, some negative (the repetition penalty's two branches)
CONTROLS = SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.5, frequency_penalty=0.7,
                          presence_penalty=0.4, logit_bias={0: 0.5, 4: -0.5}, min_tokens=1)


def processed(lm: ToyLM) -> ToyLM:
    """The toy target as logits (log p + SHIFT) after the controls, context by context, with the
    per-row reference (tests/unit/test_processors.py): PROMPT then the context's tokens as output.
    The draft's q is processed the same way, as the draft worker does."""
    out = copy.copy(lm)

    def law(rows: dict) -> dict:
        return {c: warp_with(reference(row.log().view(1, -1) + SHIFT, Rows(PROMPT + c, len(PROMPT), (), {2}), CONTROLS),
                             CONTROLS)[0] for c, row in rows.items()}

    out.p, out.q = law(lm.p), law(lm.q)
    return out


@pytest.mark.parametrize("greedy_draft", [False, True], ids=["sampled_draft", "greedy_draft"])
@pytest.mark.parametrize("k", [1, 3])
def test_sampled_rule_emits_the_processed_target_distribution(lm, k, greedy_draft):
    """The verifier's rows come from ONE vectorized process_logits call over the raw rows at
    [ctx, ctx+x1, ..., ctx+x1..xk] (row i seeing drafts[:i]); the first two emitted tokens
    must follow the processed target's law, computed context by context. A row that saw the
    wrong drafts (penalties shifted by one position) fails this."""
    target = processed(lm)

    def target_rows(ctx, drafts):
        raw = torch.stack([lm.p[ctx + drafts[:i]] for i in range(len(drafts) + 1)]).log() + SHIFT
        rows = Rows(PROMPT + ctx, len(PROMPT), drafts, {2})
        return warp_with(process_logits(raw, rows, CONTROLS), CONTROLS)

    assert 0.5 * (target.p[()] - lm.p[()]).abs().sum().item() > 0.1  # the controls move the law
    counts = simulate_first_two(target, rule_correct, k, greedy_draft, N_TRIALS, seed=7 * k + greedy_draft,
                                target_rows=target_rows)
    assert chi2_pvalue(counts.sum(1), target.p[()].numpy()) > 1e-3
    assert chi2_pvalue(counts, target.joint2()) > 1e-3
    assert min(chi2_pvalue(counts.sum(1), lm.p[()].numpy()), chi2_pvalue(counts, lm.joint2())) < 1e-6  # power


def test_rows_that_ignore_the_drafts_fail_the_same_check(lm):
    """Broken on purpose: every row processed as if no draft came before it."""
    target = processed(lm)

    def stale_rows(ctx, drafts):
        raw = torch.stack([lm.p[ctx + drafts[:i]] for i in range(len(drafts) + 1)]).log() + SHIFT
        return torch.cat([warp_with(process_logits(raw[i : i + 1], Rows(PROMPT + ctx, len(PROMPT), (), {2}), CONTROLS),
                                    CONTROLS) for i in range(len(drafts) + 1)])

    counts = simulate_first_two(target, rule_correct, 3, False, N_TRIALS // 2, seed=5, target_rows=stale_rows)
    assert chi2_pvalue(counts, target.joint2()) < 1e-6
