"""workers/sampling/acceptance.py: the greedy rule exactly, the sampled rule statistically.

The statistical tests simulate speculative decoding over a tiny vocabulary with a
context-dependent target ``p`` and a DIFFERENT draft ``q`` and check with a
chi-square test that the first emitted token follows ``p(.)`` and the first two
follow ``p(a) p(b | a)``. The same check must reject deliberately broken rules,
which shows it can fail.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from protocol.messages import SamplingParams
from tests.unit.test_processors import reference
from workers.sampling import Acceptance, Rows, accept_greedy, accept_sampled, process_logits, sample, warp_with

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


def draws(generator: torch.Generator, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k coins and k+1 picks from a generator (the engine keys them by position instead)."""
    return (
        torch.rand(k, generator=generator, dtype=torch.float64),
        torch.rand(k + 1, generator=generator, dtype=torch.float64),
    )

# ---------------------------------------------------------------- sampled, simple cases


def test_sampled_k_zero_is_plain_sampling_and_consumes_one_draw():
    p = torch.tensor([[0.1, 0.2, 0.7]])
    res = accept_sampled(torch.zeros(0, dtype=torch.int64), None, p, *draws(torch.Generator().manual_seed(5), 0))
    assert res.num_accepted == 0
    assert res.token_ids == [sample(p, torch.Generator().manual_seed(5)).item()]


def test_sampled_token_with_zero_target_probability_is_always_rejected():
    p = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for s in range(50):
        res = accept_sampled(torch.tensor([0]), q, p, *draws(torch.Generator().manual_seed(s), 1))
        assert res.num_accepted == 0 and res.token_ids[0] in (1, 2)


def test_sampled_identical_distributions_always_accept():
    p = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(1)), -1)
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        drafts = sample(p[:3], g)
        res = accept_sampled(drafts, p[:3], p, *draws(g, 3))
        assert res.num_accepted == 3 and res.token_ids[:3] == drafts.tolist()


def test_sampled_empty_residual_falls_back_to_p():
    # q >= p everywhere (unnormalised): rejection happens half the time and the
    # residual max(0, p - q) is all zero; the recovered token must come from p.
    p = torch.tensor([[0.0, 0.25, 0.75], [0.0, 0.0, 1.0]])
    q = p[:1] * 2
    rejected = []
    for s in range(400):
        res = accept_sampled(torch.tensor([2]), q, p, *draws(torch.Generator().manual_seed(s), 1))
        if res.num_accepted == 0:
            rejected.append(res.token_ids[0])
    assert 100 < len(rejected) < 300
    assert set(rejected) == {1, 2}


def test_sampled_rejects_wrong_shapes():
    g = torch.Generator()
    with pytest.raises(ValueError):
        accept_sampled(torch.tensor([1]), None, torch.ones(1, 4) / 4, *draws(g, 1))
    with pytest.raises(ValueError):
        accept_sampled(torch.tensor([1]), torch.ones(2, 4) / 4, torch.ones(2, 4) / 4, *draws(g, 1))
    with pytest.raises(ValueError):
        accept_sampled(torch.tensor([1]), None, torch.ones(2, 4) / 4, *draws(g, 2))


def test_seeded_runs_are_reproducible_and_seeds_differ():
    vocab, k = 50_000, 8
    g0 = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g0), -1)
    q = torch.softmax(torch.randn(k, vocab, generator=g0), -1)
    drafts = sample(q, g0)

    def run(seed, draft_probs):
        g = torch.Generator().manual_seed(seed)
        return [accept_sampled(drafts, draft_probs, p, *draws(g, k)) for _ in range(5)]

    for draft_probs in (q, None):
        assert run(7, draft_probs) == run(7, draft_probs)
        assert run(7, draft_probs) != run(8, draft_probs)


# ---------------------------------------------------------------- sampled, statistical

V = 5
N_TRIALS = 20_000


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
        self.q_cdf = {c: np.cumsum(self.q[c].double().numpy()) for c in contexts}
        self.q_argmax = {c: int(self.q[c].argmax()) for c in contexts}

    def joint2(self) -> np.ndarray:
        return np.array([[float(self.p[()][a]) * float(self.p[(a,)][b]) for b in range(V)] for a in range(V)])


def rule_correct(draft_ids, draft_probs, target_probs, g):
    return accept_sampled(draft_ids, draft_probs, target_probs, *draws(g, draft_ids.shape[0]))


def rule_accept_always(draft_ids, draft_probs, target_probs, g):
    """Broken: keeps every draft (the output follows q, not p)."""
    k = draft_ids.shape[0]
    bonus = sample(target_probs[k : k + 1], g).item()
    return Acceptance(num_accepted=k, token_ids=draft_ids.tolist() + [bonus])


def rule_resample_from_p(draft_ids, draft_probs, target_probs, g):
    """Broken, subtly: right acceptance test, but the recovered token comes from p_i, not the residual."""
    res = accept_sampled(draft_ids, draft_probs, target_probs, *draws(g, draft_ids.shape[0]))
    if res.num_accepted < draft_ids.shape[0]:
        fixed = sample(target_probs[res.num_accepted : res.num_accepted + 1], g).item()
        return Acceptance(res.num_accepted, res.token_ids[:-1] + [fixed])
    return res


def simulate_first_two(lm: ToyLM, rule, k: int, greedy_draft: bool, n: int, seed: int, target_rows=None) -> np.ndarray:
    """Run n independent generations (one round of k drafts, then k=1 rounds) and
    count the first two emitted tokens: returns a [V, V] count matrix.
    target_rows(ctx, drafts) -> [k+1, V] replaces the rows of lm.p (as a verifier computes them)."""
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros((V, V), dtype=np.int64)
    cache: dict = {}

    def draft(ctx, u):
        """The draft's token after ctx: inverse CDF of u under q, or argmax for a greedy draft."""
        if greedy_draft:
            return lm.q_argmax[ctx]
        return min(int(np.searchsorted(lm.q_cdf[ctx], u, side="right")), V - 1)

    def tensors(ctx, drafts):
        key = (ctx, drafts)
        if key not in cache:
            ctxs = [ctx + drafts[:i] for i in range(len(drafts) + 1)]
            qs = None if greedy_draft else torch.stack([lm.q[c] for c in ctxs[:-1]])
            ps = target_rows(ctx, drafts) if target_rows else torch.stack([lm.p[c] for c in ctxs])
            cache[key] = (torch.tensor(drafts, dtype=torch.int64), qs, ps)
        return cache[key]

    us = torch.rand(n, k + 1, generator=g, dtype=torch.float64).numpy()  # the draft's own randomness
    for t in range(n):
        ctx: tuple = ()
        emitted: list[int] = []
        rounds = 0
        while len(emitted) < 2:
            kk = k if rounds == 0 else 1
            drafts: tuple = ()
            for i in range(kk):
                drafts += (draft(ctx + drafts, us[t, len(emitted) + i]),)
            res = rule(*tensors(ctx, drafts), g)
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
@pytest.mark.parametrize("k", [1, 2, 4])
def test_sampled_rule_emits_target_distribution(lm, k, greedy_draft):
    counts = simulate_first_two(lm, rule_correct, k, greedy_draft, N_TRIALS, seed=10 * k + greedy_draft)
    p_first = chi2_pvalue(counts.sum(1), lm.p[()].numpy())
    p_joint = chi2_pvalue(counts, lm.joint2())
    assert p_first > 1e-3, p_first
    assert p_joint > 1e-3, p_joint


@pytest.mark.parametrize("rule", [rule_accept_always, rule_resample_from_p])
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
    out.q_cdf = {c: np.cumsum(row.double().numpy()) for c, row in out.q.items()}
    out.q_argmax = {c: int(row.argmax()) for c, row in out.q.items()}
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
