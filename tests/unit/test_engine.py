"""The engine loops in-process on tiny random models: lossless, queueing, stops."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from protocol.messages import DraftRequest, GenerateRequest, SamplingParams
from workers.engine import DraftEngine, LocalDraft, NoDraft, VerifyEngine
from workers.model import load_model, make_tiny_checkpoint
from workers.spec import warp

MAX_LEN = 256


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("t"), vocab_size=256, seed=0)
    stranger_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("s"), vocab_size=256, seed=1)
    return {
        "target": load_model(target_dir, dtype=torch.float32),
        "quantized": load_model(target_dir, dtype=torch.float32, quantization="int8"),
        "stranger": load_model(stranger_dir, dtype=torch.float32),
    }


def make_engine(target, draft_model=None, k=4, max_running=3):
    source = NoDraft() if draft_model is None else LocalDraft(
        DraftEngine(draft_model, max_model_len=MAX_LEN, max_requests=max_running), k
    )
    return VerifyEngine(target, source, max_model_len=MAX_LEN, max_running=max_running)


def request(i, prompt, max_tokens=40, sampling=SamplingParams(), stop=()):
    return GenerateRequest(f"r{i}", list(prompt), max_tokens, sampling, list(stop))


def run(engine, requests):
    """Serve all requests to completion; return {id: (tokens, finish_reason, outputs)}."""
    for r in requests:
        engine.add(r)
    results = {}
    while engine.has_work:
        for out in engine.step():
            tokens, _, outs = results.get(out.request_id, ([], None, []))
            tokens.extend(out.token_ids)
            outs.append(out)
            results[out.request_id] = (tokens, out.finish_reason, outs)
    return results


PROMPTS = [[5, 17, 42], [200, 3, 3, 3, 9, 1, 77], [11], [8, 6, 4, 2, 0, 1, 3, 5, 7, 9, 250, 251]]


@pytest.mark.parametrize("draft,k", [("quantized", 4), ("quantized", 1), ("stranger", 4), ("quantized", 8)])
def test_sd_equals_ar_greedy(models, draft, k):
    requests = [request(i, p) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    sd_engine = make_engine(models["target"], models[draft], k=k)
    sd = run(sd_engine, requests)
    for r in requests:
        assert sd[r.request_id][0] == ar[r.request_id][0], r.request_id
        assert sd[r.request_id][1] == ar[r.request_id][1] == "length"
    outputs = [o for _, _, outs in sd.values() for o in outs]
    drafted = sum(o.num_draft_tokens for o in outputs)
    accepted = sum(o.num_accepted_tokens for o in outputs)
    assert drafted > 0
    assert len(outputs) < sum(len(t) for t, _, _ in sd.values()) or draft == "stranger"
    if draft == "stranger":
        assert sd_engine.draft.engine.num_rollbacks > 0
    else:
        assert accepted / drafted > 0.5  # int8 of the same weights mostly agrees


def test_stop_token_ends_request(models):
    ar = run(make_engine(models["target"]), [request(0, PROMPTS[0])])
    tokens = ar["r0"][0]
    stop = tokens[5]
    first = tokens.index(stop)
    sd = run(make_engine(models["target"], models["quantized"]), [request(0, PROMPTS[0], stop=[stop])])
    assert sd["r0"][0] == tokens[: first + 1]
    assert sd["r0"][1] == "stop"


def test_max_tokens_and_context_limit(models):
    out = run(make_engine(models["target"], models["quantized"]), [request(0, PROMPTS[0], max_tokens=7)])
    assert len(out["r0"][0]) == 7 and out["r0"][1] == "length"
    long_prompt = list(range(MAX_LEN - 3))
    out = run(make_engine(models["target"], models["quantized"]), [request(1, long_prompt, max_tokens=100)])
    assert len(out["r1"][0]) == 3 and out["r1"][1] == "length"


def test_queueing_beyond_running_slots(models):
    engine = make_engine(models["target"], models["quantized"], max_running=2)
    requests = [request(i, PROMPTS[i % len(PROMPTS)], max_tokens=10) for i in range(6)]
    for r in requests:
        engine.add(r)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 4
    while engine.has_work:
        engine.step()
    assert engine.num_running == 0


def test_abort_frees_the_slot_and_draft_cache(models):
    engine = make_engine(models["target"], models["quantized"], max_running=1)
    engine.add(request(0, PROMPTS[0], max_tokens=100))
    engine.add(request(1, PROMPTS[1], max_tokens=5))
    engine.step()
    assert engine.abort("r0")
    assert not engine.abort("r0")
    assert "r0" not in engine.draft.engine._states
    results = run(engine, [])
    assert engine.num_running == 0 and not engine.has_work
    assert set(results) == {"r1"} and len(results["r1"][0]) == 5


def test_bad_requests_are_rejected(models):
    from workers.engine.verify_engine import RequestRejected

    engine = make_engine(models["target"])
    for bad in (request(0, []), request(1, [300]), request(2, list(range(MAX_LEN))), request(3, [1], max_tokens=0)):
        with pytest.raises(RequestRejected):
            engine.add(bad)


def test_seeded_sampling_is_reproducible(models):
    def sampled(seed):
        sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        engine = make_engine(models["target"], models["stranger"])
        return run(engine, [request(0, PROMPTS[1], max_tokens=30, sampling=sampling)])["r0"][0]

    assert sampled(1) == sampled(1)
    assert sampled(1) != sampled(2)


def test_draft_rollback_equals_fresh_draft(models):
    """After a rejection the draft's cache is cropped; its next drafts equal a fresh draft's."""
    greedy = SamplingParams()
    used = DraftEngine(models["quantized"], max_model_len=MAX_LEN, max_requests=2)
    drafted, _ = used.draft(DraftRequest("a", 1, PROMPTS[1], 6, greedy))
    wrong = (drafted[2] + 1) % 256
    verified = PROMPTS[1] + drafted[:2] + [wrong]  # the verifier rejected the third draft
    after_rollback, _ = used.draft(DraftRequest("a", 2, verified, 6, greedy))
    assert used.num_rollbacks == 1
    fresh = DraftEngine(models["quantized"], max_model_len=MAX_LEN, max_requests=2)
    expected, _ = fresh.draft(DraftRequest("b", 1, verified, 6, greedy))
    assert after_rollback == expected


def _joint_counts(tokens_by_seed, vocab):
    counts = np.zeros((vocab, vocab))
    for t in tokens_by_seed:
        counts[t[0], t[1]] += 1
    return counts.ravel()


def _chi2_pvalue(observed, expected_probs):
    expected = expected_probs * observed.sum()
    keep = expected >= 5  # pool sparse cells so the chi-square approximation holds
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def test_sd_sampling_matches_target_distribution(tmp_path_factory):
    """The first two emitted tokens of sd (one 2-draft round) follow the target's joint law."""
    vocab = 8
    target = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8t"), vocab_size=vocab, seed=3), dtype=torch.float32)
    draft = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8d"), vocab_size=vocab, seed=4), dtype=torch.float32)
    params = dict(temperature=0.9, top_k=6, top_p=0.95)
    prompt = [1, 2, 3]
    trials = 2500
    engine = make_engine(target, draft, k=2, max_running=4)
    requests = [request(i, prompt, max_tokens=3, sampling=SamplingParams(seed=i, **params)) for i in range(trials)]
    results = run(engine, requests)
    observed = _joint_counts([tokens for tokens, _, _ in results.values()], vocab)

    def joint(model):
        with torch.inference_mode():
            first = warp(model.forward(torch.tensor(prompt), model.new_cache(16)), **params)[0]
            rows = [warp(model.forward(torch.tensor(prompt + [t]), model.new_cache(16)), **params)[0] for t in range(vocab)]
        return (first[:, None] * torch.stack(rows)).ravel().numpy().astype(np.float64)

    assert _chi2_pvalue(observed, joint(target)) > 1e-3
    # the same check rejects the draft's law: the test has power
    assert _chi2_pvalue(observed, joint(draft)) < 1e-6
