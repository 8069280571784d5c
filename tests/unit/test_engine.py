"""The engine loops in-process on tiny random models: lossless, queueing, stops."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from configs.modes import mode_of
from protocol.codec import encode
from protocol.messages import BeginDrafting, GenerateRequest, SamplingParams, VerifiedPrefix
from tests.local_draft import LocalTransport, random_steps
from workers.engine import DraftEngine, DraftStream, NoDraft, PlainDraft, VerifyEngine
from workers.model import load_model
from tests.tiny_model import make_tiny_checkpoint
from workers.sampling import warp

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


def make_engine(
    target, draft_model=None, k=4, max_running=3, mode="sd", run_ahead=None, steps=None, grammars=None,
    prefix_caching=True, prefill_chunk=512, holds_back=False,
):
    """mode sd: each round waits for k drafts. mode amusd: the draft advances by a
    random number of tokens between verifications (its timing on another device).
    grammars: a workers.sampling.grammar.Grammars for both sides (requests with a grammar).
    holds_back: the draft does not catch up while idle, and gets a request's tokens only when
    told to draft for it again (a synchronous draft's worker, or one whose cores are borrowed)."""
    caching = dict(prefix_caching=prefix_caching, prefill_chunk=prefill_chunk)
    if draft_model is None:
        return VerifyEngine(
            target, NoDraft(), max_model_len=MAX_LEN, max_running=max_running, grammars=grammars, **caching
        )
    if not hasattr(draft_model, "after_rollback"):  # a bare model, not a DraftModel
        draft_model = PlainDraft(draft_model)
    draft = DraftEngine(draft_model, max_model_len=MAX_LEN, max_requests=max_running, grammars=grammars,
                        catch_up=not holds_back, **caching)
    if mode == "amusd" and steps is None:
        steps = random_steps(seed=k)
    source = DraftStream(
        LocalTransport(draft, steps),
        num_draft_tokens=k,
        max_run_ahead=run_ahead or k,
        mode=mode_of(mode),
        timeout_s=60,
        holds_back=holds_back,
    )
    return VerifyEngine(target, source, max_model_len=MAX_LEN, max_running=max_running, grammars=grammars, **caching)


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


@pytest.mark.parametrize(
    "mode,draft,k",
    [
        ("sd", "quantized", 4),
        ("sd", "quantized", 1),
        ("sd", "stranger", 4),
        ("sd", "quantized", 8),
        ("amusd", "quantized", 4),
        ("amusd", "stranger", 4),
        ("amusd", "quantized", 8),
    ],
)
def test_speculative_equals_ar_greedy(models, mode, draft, k):
    requests = [request(i, p) for i, p in enumerate(PROMPTS)]
    ar = run(make_engine(models["target"]), requests)
    engine = make_engine(models["target"], models[draft], k=k, mode=mode, run_ahead=2 * k)
    spec = run(engine, requests)
    for r in requests:
        assert spec[r.request_id][0] == ar[r.request_id][0], r.request_id
        assert spec[r.request_id][1] == ar[r.request_id][1] == "length"
    outputs = check_drafting(engine, spec, stranger=draft == "stranger")
    if mode == "amusd":
        assert len({o.num_draft_tokens for o in outputs}) > 1  # rounds of varying size


def check_drafting(engine, results, stranger: bool):
    """Drafts were verified: a stranger's forced rollbacks; an int8 copy's were mostly
    accepted (rounds emitting several tokens). Returns every TokenOutput."""
    outputs = [o for _, _, outs in results.values() for o in outs]
    drafted = sum(o.num_draft_tokens for o in outputs)
    accepted = sum(o.num_accepted_tokens for o in outputs)
    assert drafted > 0
    if stranger:
        assert engine.draft.transport.engine.num_rollbacks > 0
    else:
        assert accepted / drafted > 0.5  # int8 of the same weights mostly agrees
        assert len(outputs) < sum(len(t) for t, _, _ in results.values())
    return outputs


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
    assert "r0" not in engine.draft.transport.engine._states
    results = run(engine, [])
    assert engine.num_running == 0 and not engine.has_work
    assert set(results) == {"r1"} and len(results["r1"][0]) == 5


def test_bad_requests_are_rejected(models):
    from workers.engine.verify_engine import RequestRejected

    engine = make_engine(models["target"])
    for bad in (request(0, []), request(1, [300]), request(2, list(range(MAX_LEN))), request(3, [1], max_tokens=0)):
        with pytest.raises(RequestRejected):
            engine.add(bad)


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_a_vanishing_temperature_is_greedy_in_the_workers(models, mode):
    """A request that reaches the engine with temperature 1e-62 (no server in
    front to round it to 0) decodes greedily instead of warping to NaN."""
    greedy = run(make_engine(models["target"]), [request(0, PROMPTS[1], max_tokens=20)])["r0"][0]
    tiny = SamplingParams(temperature=1e-62, seed=3)
    engine = make_engine(models["target"], models["stranger"], mode=mode)
    out = run(engine, [request(0, PROMPTS[1], max_tokens=20, sampling=tiny)])["r0"]
    assert out[0] == greedy and out[1] == "length"


def sampled_tokens(models, seed, mode="sd", steps_seed=0):
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    steps = random_steps(steps_seed) if mode == "amusd" else None
    engine = make_engine(models["target"], models["quantized"], mode=mode, run_ahead=8, steps=steps)
    return run(engine, [request(0, PROMPTS[1], max_tokens=30, sampling=sampling)])["r0"][0]


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_seeded_sampling_is_reproducible(models, mode):
    assert sampled_tokens(models, 1, mode) == sampled_tokens(models, 1, mode)
    assert sampled_tokens(models, 1, mode) != sampled_tokens(models, 2, mode)


def test_amusd_sampling_does_not_depend_on_timing(models):
    """Keyed randomness: how many drafts each verification saw does not change the text."""
    runs = {tuple(sampled_tokens(models, 5, "amusd", steps_seed)) for steps_seed in range(4)}
    assert len(runs) == 1


def begin(tokens, epoch=0, run_ahead=6, request_id="a"):
    return BeginDrafting(request_id, epoch, list(tokens), run_ahead, SamplingParams())


def verified(start, new_tokens, epoch, run_ahead=6, request_id="a"):
    return VerifiedPrefix(request_id, epoch, start, list(new_tokens), run_ahead)


def draft_all(engine):
    drafted = []
    while (d := engine.step()) is not None:
        drafted.append(d)
    return drafted


def test_draft_rollback_equals_fresh_draft(models):
    """After a rejection the draft's cache is cropped; its next drafts equal a fresh draft's."""
    used = DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=2)
    used.begin(begin(PROMPTS[1]))
    drafted = [m.token_ids[0] for m in draft_all(used)]
    assert len(drafted) == 6
    wrong = (drafted[2] + 1) % 256
    verified_tokens = PROMPTS[1] + drafted[:2] + [wrong]  # the verifier rejected the third draft
    assert used.update(verified(len(PROMPTS[1]), drafted[:2] + [wrong], 1)) is None
    assert used.num_rollbacks == 1
    after_rollback = [m.token_ids[0] for m in draft_all(used)]
    fresh = DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=2)
    fresh.begin(begin(verified_tokens))
    assert after_rollback == [m.token_ids[0] for m in draft_all(fresh)]


def test_draft_adopts_the_epoch_on_every_update(models):
    """Also when the verified prefix agrees with its drafts: those are re-sent under the new epoch."""
    engine = DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=2)
    engine.begin(begin(PROMPTS[0], 0, run_ahead=4))
    drafted = draft_all(engine)
    assert [m.epoch for m in drafted] == [0, 0, 0, 0]
    tokens = [m.token_ids[0] for m in drafted]
    again = engine.update(verified(len(PROMPTS[0]), tokens[:2], 1, run_ahead=4))  # two accepted, agrees
    assert engine.num_rollbacks == 0
    assert again.epoch == 1 and again.token_ids == tokens[2:]
    assert again.start == len(PROMPTS[0]) + 2
    assert {m.epoch for m in draft_all(engine)} == {1}


def test_stale_drafts_are_never_verified(models):
    from protocol.messages import DraftTokens

    class Silent:
        def __init__(self):
            self.sent, self.inbox = [], []

        def send(self, message):
            self.sent.append(message)
            return True

        def receive(self, timeout_s):
            out, self.inbox = self.inbox, []
            return out

    transport = Silent()
    stream = DraftStream(transport, num_draft_tokens=4, max_run_ahead=4, mode=mode_of("amusd"), timeout_s=0.01)
    engine = VerifyEngine(models["target"], stream, max_model_len=MAX_LEN, max_running=2)
    engine.add(request(0, PROMPTS[0], max_tokens=20))
    engine.step()  # admit + prefill: publishes epoch 0
    assert transport.sent[-1].epoch == 0
    n = len(PROMPTS[0])
    transport.inbox = [DraftTokens("r0", 0, n, [7, 8])]
    out = engine.step()[0]
    assert out.num_draft_tokens == 2
    assert transport.sent[-1].epoch == 1
    stale_start = transport.sent[-1].start + len(transport.sent[-1].new_tokens)
    transport.inbox = [DraftTokens("r0", 0, stale_start, [9, 9, 9])]  # drafted from epoch 0: stale
    out = engine.step()[0]
    assert out.num_draft_tokens == 0  # timed out waiting; nothing stale was verified
    assert stream.num_stale == 3


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


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_sampling_matches_target_distribution(tmp_path_factory, mode):
    """The first two emitted tokens follow the target's joint law, whatever the draft."""
    vocab = 8
    target = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8t"), vocab_size=vocab, seed=3), dtype=torch.float32)
    draft = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8d"), vocab_size=vocab, seed=4), dtype=torch.float32)
    params = dict(temperature=0.9, top_k=6, top_p=0.95)
    prompt = [1, 2, 3]
    trials = 2500
    engine = make_engine(target, draft, k=2, max_running=4, mode=mode, run_ahead=3)
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


def test_each_round_sends_the_draft_only_the_new_tokens(models):
    """The verifier begins a request on the draft once, then each verified prefix is
    (epoch, start, new tokens): a round's message does not grow with the sequence, and
    the draft can rebuild the whole sequence from them."""

    class Recording(LocalTransport):
        def __init__(self, engine):
            super().__init__(engine)
            self.sent = []

        def send(self, message):
            self.sent.append(message)
            return super().send(message)

    k = 4
    transport = Recording(DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=1))
    stream = DraftStream(transport, num_draft_tokens=k, max_run_ahead=k, mode=mode_of("sd"), timeout_s=60)
    engine = VerifyEngine(models["target"], stream, max_model_len=MAX_LEN, max_running=1)
    tokens, _, _ = run(engine, [request(0, PROMPTS[0], max_tokens=200)])["r0"]

    begun, *updates = [m for m in transport.sent if isinstance(m, (BeginDrafting, VerifiedPrefix))]
    assert isinstance(begun, BeginDrafting) and begun.tokens == PROMPTS[0]
    assert len(updates) > 20 and all(isinstance(m, VerifiedPrefix) for m in updates)
    rebuilt = list(begun.tokens)
    for epoch, update in enumerate(updates, start=1):
        assert update.epoch == epoch and update.start == len(rebuilt) and 1 <= len(update.new_tokens) <= k + 1
        rebuilt += update.new_tokens
    assert rebuilt == (PROMPTS[0] + tokens)[: len(rebuilt)] and len(rebuilt) >= len(PROMPTS[0]) + len(tokens) - (k + 1)
    sizes = [len(encode(m)[0]) for m in updates]
    assert max(sizes) - min(sizes) < 16  # no term in the sequence length


def test_draft_engine_calls_the_round_hooks_explicitly(models):
    """after_verified when the verifier kept to the drafts, after_rollback (with the common
    prefix) when it parted from them: the hooks EasySpec's calibration hangs on."""

    class Recording(PlainDraft):
        def __init__(self, model):
            super().__init__(model)
            self.calls = []

        def after_rollback(self, cache, keep):
            self.calls.append(("rollback", keep))
            super().after_rollback(cache, keep)

        def after_verified(self, cache, verified_len):
            self.calls.append(("verified", verified_len))

    model = Recording(models["quantized"])
    engine = DraftEngine(model, max_model_len=MAX_LEN, max_requests=2)
    engine.begin(begin(PROMPTS[1], 0, run_ahead=4))
    drafted = [m.token_ids[0] for m in draft_all(engine)]
    n = len(PROMPTS[1])
    model.calls.clear()
    engine.update(verified(n, drafted[:2], 1, run_ahead=4))  # two drafts accepted, no correction yet
    assert model.calls == [("verified", n + 2)]
    engine.update(verified(n + 2, [(drafted[2] + 1) % 256], 2, run_ahead=4))  # the third rejected
    assert model.calls[1:] == [("rollback", n + 2)]
    engine.release("a")
    assert model.calls[-1] == ("rollback", 0)


def test_prompt_logprobs_come_from_the_prefill_only_when_asked(models):
    """Prompt logprobs equal log_softmax of one full forward pass (row i scores token
    i+1), arrive on the first output only, and max_tokens 0 ends after the prefill.
    Without them the prefill computes no logits. Catches: an off-by-one row, prompt
    logits paid by every request, max_tokens 0 generating a token."""
    target = models["target"]
    prompt = PROMPTS[3]
    seen_logits: list[int] = []
    engine = make_engine(target, models["quantized"], prefix_caching=False)  # the second prompt is prefilled again

    class Spy:  # the target, noting each pass's logits rows
        def forward_batch(self, segments):
            seen_logits.extend(s.num_logits for s in segments)
            return target.forward_batch(segments)

    engine.model = Spy()
    asked = GenerateRequest("p", prompt, 6, SamplingParams(), [], num_logprobs=2, prompt_logprobs=3)
    plain = GenerateRequest("q", prompt, 6, SamplingParams(), [])
    only = GenerateRequest("z", prompt, 0, SamplingParams(), [], prompt_logprobs=0)
    results = run(engine, [asked])
    assert seen_logits[0] == len(prompt) - 1  # the prefill of the one that asked
    seen_logits.clear()
    plain_results = run(engine, [plain])
    assert seen_logits[0] == 0  # no logits for a prefill nobody scores
    outputs = results["p"][2]
    assert results["p"][0] == plain_results["q"][0]  # scoring the prompt does not change the output
    with torch.inference_mode():
        cache = target.new_cache(MAX_LEN)
        reference = torch.log_softmax(target.forward(torch.tensor(prompt), cache, len(prompt)), dim=-1)
    expected = reference[:-1].gather(-1, torch.tensor(prompt[1:])[:, None]).squeeze(-1)
    assert outputs[0].prompt_logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    top = reference[:-1].topk(3, dim=-1)
    assert [[t for t, _ in row] for row in outputs[0].prompt_top_logprobs] == top.indices.tolist()
    assert all(o.prompt_logprobs is None for o in outputs[1:])
    zero = run(engine, [only])["z"]
    assert zero[0] == [] and zero[1] == "length" and len(zero[2]) == 1
    assert zero[2][0].prompt_logprobs == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(ValueError):  # max_tokens 0 without prompt logprobs: nothing to answer
        engine.add(GenerateRequest("y", prompt, 0, SamplingParams(), []))


def test_step_stats_for_metrics(models):
    """iteration_tokens (vLLM: prompt tokens computed + tokens generated per step)
    and kv_cache_usage. Catches: prompt tokens counted per round instead of once,
    emitted tokens missed in the histogram, usage not reading the caches' lengths."""
    # without prefix caching: the last request prefills its prompt again
    engine = make_engine(models["target"], models["quantized"], k=4, max_running=2, prefix_caching=False)
    prompts = [PROMPTS[1], PROMPTS[3]]
    for i, prompt in enumerate(prompts):
        engine.add(request(i, prompt, max_tokens=12))
    seen_usage, emitted, steps = [], 0, 0
    while engine.has_work:
        outputs = engine.step()
        steps += 1
        emitted += sum(len(o.token_ids) for o in outputs)
        seen_usage.append(engine.kv_cache_usage)
    counts = engine.iteration_tokens
    assert sum(counts.counts) == steps  # every step observed once
    assert counts.sum == sum(len(p) for p in prompts) + emitted
    assert max(seen_usage) > 0 and seen_usage[-1] == 0  # the finished requests' caches were given back
    # after a prefill, the cache holds all but the prompt's last token, out of 2 caches x MAX_LEN slots
    engine.add(request(9, PROMPTS[3], max_tokens=4))
    engine.step()
    assert engine.kv_cache_usage == (len(PROMPTS[3]) - 1) / (2 * MAX_LEN)
