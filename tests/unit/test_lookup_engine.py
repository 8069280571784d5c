"""Mode `lookup` in the verify engine, in-process on tiny random models: prompt-lookup
drafts (workers/engine/prompt_lookup.py) verified by the target, lossless."""

from __future__ import annotations

import pytest
import torch

from protocol.messages import SamplingParams
from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_engine import MAX_LEN, _chi2_pvalue, _joint_counts, make_engine, models, request, run  # noqa: F401
from configs.modes import mode_of
from tests.local_draft import LocalTransport
from workers.engine import DraftEngine, PlainDraft, VerifyEngine
from workers.engine.prompt_lookup import LookupFirst, PromptLookup
from workers.model import load_model
from workers.sampling import warp

# repetitive prompts (the lookup has matches from the start) and a plain one
PROMPTS = [
    [5, 17, 42, 9, 5, 17, 42, 9, 5, 17],
    [200, 3, 3, 3, 9, 1, 77, 3, 3, 3, 9],
    [8, 6, 4, 2, 0, 1, 3, 5, 7, 9, 250, 251],
]


def lookup_engine(target, k=4, min_n=1, max_n=3, max_running=3):
    source = PromptLookup(num_draft_tokens=k, min_n=min_n, max_n=max_n)
    return VerifyEngine(target, source, max_model_len=MAX_LEN, max_running=max_running)


def _outputs(results):
    return [o for _, _, outs in results.values() for o in outs]


@pytest.mark.parametrize("k,min_n,max_n", [(4, 1, 3), (2, 2, 4), (8, 1, 1)])
def test_lookup_equals_ar_greedy(models, k, min_n, max_n):
    """Greedy lookup output is the target's own, token for token (float32), with drafts
    proposed and accepted and rounds without a match left draft-free. Catches an
    acceptance off by one on one-hot drafts, a proposal read from the wrong position,
    or a stale index after a round (accepted drafts would then diverge from ar)."""
    requests = [request(i, p, max_tokens=60) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    results = run(lookup_engine(models["target"], k, min_n, max_n), requests)
    for r in requests:
        assert results[r.request_id][:2] == (ar[r.request_id][0], "length"), r.request_id
    outputs = _outputs(results)
    drafted = sum(o.num_draft_tokens for o in outputs)
    accepted = sum(o.num_accepted_tokens for o in outputs)
    assert drafted > 0 and accepted > 0
    assert len(outputs) < sum(len(t) for t, _, _ in results.values())  # some rounds emitted several tokens
    assert all(o.num_draft_tokens <= k for o in outputs)


def test_no_match_means_no_drafts(models):
    """min_n above anything that recurs: every round is a plain decode step (ar's cost)
    with ar's tokens. Catches a source that pads a missing match with guesses."""
    prompt = [8, 6, 4, 2, 0, 1, 3, 5, 7, 9]
    ar = run(make_engine(models["target"]), [request(0, prompt, max_tokens=8)])
    results = run(lookup_engine(models["target"], min_n=12, max_n=12), [request(0, prompt, max_tokens=8)])
    assert results["r0"][0] == ar["r0"][0]
    assert all(o.num_draft_tokens == 0 for o in results["r0"][2])


def _sampled(models, seed):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    results = run(lookup_engine(models["target"]), [request(0, PROMPTS[1], max_tokens=30, sampling=sampling)])
    return results["r0"][0], results["r0"][2]


def test_seeded_sampling_is_reproducible(models):
    """A seeded request gives the same text run after run (the drafts depend on the
    tokens only), another seed another text; drafts were verified."""
    first, outputs = _sampled(models, 1)
    assert _sampled(models, 1)[0] == first
    assert _sampled(models, 2)[0] != first
    assert sum(o.num_draft_tokens for o in outputs) > 0


def test_sampling_matches_target_distribution(tmp_path_factory):
    """The first two emitted tokens follow the target's joint law under one-hot lookup
    drafts (vocabulary 8; the prompt ends in a recurring bigram, so the first round
    verifies drafts). Catches a rule that keeps a one-hot draft with probability 1, or
    a residual that keeps the rejected token (its mass would show up in the counts)."""
    vocab = 8
    target = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8t"), vocab_size=vocab, seed=3), dtype=torch.float32)
    params = dict(temperature=0.9, top_k=6, top_p=0.95)
    prompt = [1, 0, 4, 1, 0]  # drafts [4, 1]: the target gives 4 p=0.51 here, then 1 p=0.28
    trials = 2500
    engine = lookup_engine(target, k=2, min_n=1, max_n=2, max_running=4)
    requests = [request(i, prompt, max_tokens=3, sampling=SamplingParams(seed=i, **params)) for i in range(trials)]
    results = run(engine, requests)
    first_rounds = [outs[0] for _, _, outs in results.values()]
    assert all(o.num_draft_tokens == 2 for o in first_rounds)  # proposals [4, 1]
    accepted = [o.num_accepted_tokens for o in first_rounds]
    assert 0 < accepted.count(0) < trials and max(accepted) == 2  # both branches of the rule ran
    observed = _joint_counts([tokens for tokens, _, _ in results.values()], vocab)

    with torch.inference_mode():
        first = warp(target.forward(torch.tensor(prompt), target.new_cache(16)), **params)[0]
        rows = [warp(target.forward(torch.tensor(prompt + [t]), target.new_cache(16)), **params)[0] for t in range(vocab)]
    law = (first[:, None] * torch.stack(rows)).ravel().numpy().astype("float64")
    assert _chi2_pvalue(observed, law) > 1e-3


def test_lookup_first_hybrid_equals_ar_greedy(models):
    """sd+lookup: rounds take lookup drafts where the tokens match, the draft model's
    elsewhere; greedy text equals ar's. The draft model spends no pass on a lookup
    round (it is told to run 0 ahead). Catches a hybrid that lets the model draft
    anyway (wasted draft passes) or verifies one source's drafts with the other's
    bookkeeping (text parting from ar's)."""
    k = 4
    requests = [request(i, p, max_tokens=60) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    draft = DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=3)
    source = LookupFirst(
        LocalTransport(draft),
        lookup=PromptLookup(num_draft_tokens=k, min_n=1, max_n=3),
        num_draft_tokens=k,
        max_run_ahead=k,
        mode=mode_of("sd+lookup"),
        timeout_s=60,
    )
    results = run(VerifyEngine(models["target"], source, max_model_len=MAX_LEN, max_running=3), requests)
    for r in requests:
        assert results[r.request_id][:2] == (ar[r.request_id][0], "length"), r.request_id
    outputs = _outputs(results)
    model_rounds = sum(1 for o in outputs if o.num_draft_tokens) - source.num_lookup_rounds
    assert source.num_lookup_rounds > 0 and model_rounds > 0
    assert 0 < draft.num_drafted <= k * model_rounds
    assert sum(o.num_accepted_tokens for o in outputs) > 0
