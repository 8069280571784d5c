"""EasySpec in one process: the fuzzy forward's math, KV calibration and its policies (float32)."""

from __future__ import annotations

import pytest
import torch

from configs.loader import EasySpecConfig
from workers.easyspec import LayerParallelDraftModel, make_layer_plan, plan_of
from workers.model import load_model
from workers.model.model import Segment
from tests.easyspec_probe import batch_states
from tests.tiny_model import make_tiny_checkpoint

N_LAYERS = 6
PROMPT = torch.tensor([5, 17, 42, 9, 1, 3, 200, 77])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("es"), n_layers=N_LAYERS, vocab_size=256, seed=3)
    return load_model(path, dtype=torch.float32)


SEQUENTIAL = make_layer_plan(N_LAYERS, 2, groups=[[i] for i in range(N_LAYERS)])
PARALLEL = make_layer_plan(N_LAYERS, 2, sequential_head=1, sequential_tail=1)  # [0] [1,2] [3,4] [5]


def exact_run(model, tokens: torch.Tensor, num_logits: int = 1):
    cache = model.new_cache(64)
    return model.forward(tokens, cache, num_logits=num_logits), cache


def passes(model, cache, **kwargs):
    """A prefill of 3 tokens, then token by token (as drafting does)."""
    logits = model.forward(PROMPT[:3], cache, num_logits=3)
    for t in PROMPT[3:]:
        logits = torch.cat([logits, model.forward(t[None], cache, **kwargs)])
    return logits


def test_sequential_plan_equals_the_ordinary_draft_exactly(model):
    ref_cache = model.new_cache(64)
    ref_logits = passes(model, ref_cache)
    draft = LayerParallelDraftModel.local(model, SEQUENTIAL)
    cache = draft.new_cache(64)
    logits = passes(draft, cache, exact=False)  # fuzzy passes of an all-sequential plan
    assert torch.equal(logits, ref_logits)
    assert torch.equal(cache.k[:, :, : len(PROMPT)], ref_cache.k[:, :, : len(PROMPT)])
    assert torch.equal(cache.v[:, :, : len(PROMPT)], ref_cache.v[:, :, : len(PROMPT)])
    assert cache.exact_length == cache.length == len(PROMPT)


def manual_fuzzy(model, tokens, variant):
    """The group formulas written out on the runtime's layers, for plan [0] [1,2] [3,4] [5]."""
    cache = model.new_cache(64)
    pos = model.positions(0, len(tokens))
    L = model.layers
    h = L[0](model.embed(tokens), cache.layer(0), pos)
    for i, j in ((1, 2), (3, 4)):
        if variant == "full":
            hi = L[i](h, cache.layer(i), pos)
            hj = L[j](h, cache.layer(j), pos)
            h = h + (hi - h) + (hj - h)
        else:
            h = h + L[i].attention_block(h, cache.layer(i), pos) + L[j].attention_block(h, cache.layer(j), pos)
            h = h + L[i].mlp_block(h)
            h = h + L[j].mlp_block(h)
    h = L[5](h, cache.layer(5), pos)
    return model.head(h, len(tokens)), cache


@pytest.mark.parametrize("variant", ["full", "attention"])
def test_fuzzy_forward_follows_the_group_formulas_and_differs_from_exact(model, variant):
    draft = LayerParallelDraftModel.local(model, PARALLEL, variant=variant)
    cache = draft.new_cache(64)
    logits = draft.forward(PROMPT, cache, num_logits=len(PROMPT), exact=False)
    want, want_cache = manual_fuzzy(model, PROMPT, variant)
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    n = len(PROMPT)
    torch.testing.assert_close(cache.k[:, :, :n], want_cache.k[:, :, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :n], want_cache.v[:, :, :n], rtol=1e-4, atol=1e-4)
    # approximate: not the exact model
    exact_logits, exact_cache = exact_run(model, PROMPT, num_logits=n)
    assert (logits - exact_logits).abs().max() > 0.1
    # layers 0 and 1 read their exact inputs ...
    assert torch.equal(cache.k[:2, :, :n], exact_cache.k[:2, :, :n])
    # ... layer 2 reads layer 1's input instead of its output, and everything after is approximate
    for layer in range(2, N_LAYERS):
        assert (cache.k[layer, :, :n] - exact_cache.k[layer, :, :n]).abs().max() > 1e-3, layer
    assert cache.exact_length == 0


def test_attention_variant_is_closer_to_exact_than_full(model):
    exact_logits, _ = exact_run(model, PROMPT, num_logits=len(PROMPT))
    errors = {}
    for variant in ("full", "attention"):
        draft = LayerParallelDraftModel.local(model, PARALLEL, variant=variant)
        logits = draft.forward(PROMPT, draft.new_cache(64), num_logits=len(PROMPT), exact=False)
        errors[variant] = (logits - exact_logits).abs().mean().item()
    assert errors["attention"] < errors["full"]


def test_calibration_makes_the_verified_kv_exact(model):
    """Prompt, 4 fuzzy drafts, the verifier accepts 2 and corrects the 3rd: calibration recomputes
    the accepted drafts and the correction exactly; their KV equals a sequential forward's."""
    draft = LayerParallelDraftModel.local(model, PARALLEL)
    cache = draft.new_cache(64)
    logits = draft.forward(PROMPT, cache)  # the prompt: exact
    drafted = [int(logits.argmax())]
    for _ in range(3):
        drafted.append(int(draft.forward(torch.tensor(drafted[-1:]), cache).argmax()))
    assert cache.length == len(PROMPT) + 3 and cache.exact_length == len(PROMPT)
    fuzzy_k = cache.k[:, :, : cache.length].clone()

    correction = (drafted[2] + 1) % 256
    verified = PROMPT.tolist() + drafted[:2] + [correction]
    draft.after_rollback(cache, len(PROMPT) + 2)  # what DraftEngine does on the verifier's answer
    next_logits = draft.forward(torch.tensor([correction]), cache)  # the calibration pass
    n = len(verified)
    assert cache.length == cache.exact_length == n

    exact_logits, exact_cache = exact_run(model, torch.tensor(verified))
    torch.testing.assert_close(next_logits, exact_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, :, :n], exact_cache.k[:, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :n], exact_cache.v[:, :, :n], rtol=1e-5, atol=1e-5)
    # the accepted drafts' KV was fuzzy before (else this test would show nothing)
    p = len(PROMPT)
    assert (fuzzy_k[3:, :, p + 1 : p + 2] - exact_cache.k[3:, :, p + 1 : p + 2]).abs().max() > 1e-3

    stats = draft.stats()
    assert stats["calibrations"] == 1 and stats["calibrated_tokens"] == 2
    assert stats["fuzzy_passes"] == 3 and stats["exact_passes"] == 2  # prompt + calibration


def run_rounds(draft, accept_pattern, k=3):
    """Rounds of k greedy drafts, driven the way DraftEngine drives a model: the verifier accepts
    accept_pattern[r] drafts and adds a token of its own (correction, or bonus after k); the
    cache is rolled back to the common prefix and the new tokens are fed at the next round's start.
    Returns (cache, verified tokens); the last verified token is not fed yet."""
    cache = draft.new_cache(128)
    verified = PROMPT.tolist()
    for accepted in accept_pattern:
        logits = draft.forward(torch.tensor(verified[cache.length :]), cache)
        drafted = [int(logits.argmax())]
        for _ in range(k - 1):
            drafted.append(int(draft.forward(torch.tensor(drafted[-1:]), cache).argmax()))
        extra = (drafted[accepted] + 7) % 256 if accepted < k else 11
        common = len(verified) + accepted
        verified = verified + drafted[:accepted] + [extra]
        draft.after_rollback(cache, min(cache.length, common))
    return cache, verified


@pytest.mark.parametrize(
    "policy,pattern,calibrations",
    [
        ("every_round", [3, 1, 0, 3], 4),
        ("on_mismatch", [3, 1, 0, 3], 2),  # rounds 2 and 3 dropped drafts the cache held
        ("never", [3, 1, 0, 3], 0),
    ],
)
def test_calibration_policies(model, policy, pattern, calibrations):
    draft = LayerParallelDraftModel.local(model, PARALLEL, calibration=policy)
    cache, verified = run_rounds(draft, pattern)
    logits = draft.forward(torch.tensor(verified[cache.length :]), cache)
    assert draft.stats()["calibrations"] == calibrations
    n = len(verified)
    exact_logits, exact_cache = exact_run(model, torch.tensor(verified))
    kv_error = (cache.k[:, :, :n] - exact_cache.k[:, :, :n]).abs().max().item()
    if policy == "every_round":
        assert cache.exact_length == n
        torch.testing.assert_close(logits, exact_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.k[:, :, :n], exact_cache.k[:, :, :n], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.v[:, :, :n], exact_cache.v[:, :, :n], rtol=1e-4, atol=1e-4)
    else:
        assert cache.exact_length < n
        assert kv_error > 1e-3  # fuzzy entries stayed


def test_calibrate_in_place_keeps_the_tokens_drafted_beyond(model):
    """For a draft running ahead (amusd+easyspec): recalibrate a verified prefix, keep the rest."""
    draft = LayerParallelDraftModel.local(model, PARALLEL, calibration="never")
    cache = draft.new_cache(64)
    tokens = [int(draft.forward(PROMPT, cache).argmax())]
    for _ in range(5):
        tokens.append(int(draft.forward(torch.tensor(tokens[-1:]), cache).argmax()))
    p, length = len(PROMPT), cache.length
    assert length == p + 5
    beyond_k = cache.k[:, :, p + 3 : length].clone()
    logits = draft.calibrate(cache, upto=p + 3)
    assert cache.length == length and cache.exact_length == p + 3
    exact_logits, exact_cache = exact_run(model, torch.tensor(PROMPT.tolist() + tokens[:3]))
    torch.testing.assert_close(logits, exact_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[:, :, : p + 3], exact_cache.k[:, :, : p + 3], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.k[:, :, p + 3 : length], beyond_k)
    assert draft.calibrate(cache, upto=p + 2) is None  # already exact
    with pytest.raises(ValueError, match="cannot calibrate"):
        draft.calibrate(cache, upto=length + 1)


def test_long_fuzzy_passes_are_chunked_without_changing_the_result(model):
    draft = LayerParallelDraftModel.local(model, PARALLEL)
    ref = draft.forward(PROMPT, draft.new_cache(64), num_logits=5, exact=False)
    draft.max_fuzzy_tokens = 3
    draft.reset_stats()
    cache = draft.new_cache(64)
    chunked = draft.forward(PROMPT, cache, num_logits=5, exact=False)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)
    assert cache.length == len(PROMPT) and draft.stats()["fuzzy_passes"] == 1


def test_config_builds_the_plan_and_refuses_bad_values(model):
    config = EasySpecConfig(sequential_head=1, sequential_tail=1)
    assert plan_of(config, N_LAYERS, 2) == PARALLEL
    assert plan_of(EasySpecConfig(groups=((0,), (1, 2), (3,), (4, 5))), N_LAYERS, 2).parallel_groups == ((1, 2), (4, 5))
    draft = LayerParallelDraftModel.from_config(model, None, config, placements=[None])
    assert draft.plan.is_sequential  # one device: nothing to run side by side
    with pytest.raises(ValueError, match="easyspec.calibration"):
        EasySpecConfig(calibration="sometimes")
    with pytest.raises(ValueError, match="easyspec.variant"):
        EasySpecConfig(variant="mlp")
    with pytest.raises(ValueError, match="expected layer"):
        plan_of(EasySpecConfig(groups=((1,), (0,))), 2, 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["full", "attention"])
def test_batched_step_equals_each_request_alone(tmp_path, dtype, variant):
    """One forward_batch over requests in every state (a prompt, fuzzy drafting at two cache
    lengths, a calibration after a rollback) gives each request bit for bit the logits, KV
    and exact length it gets from a pass of its own, and counts the same passes. Catches a
    row of one request attending to another's cache, a calibration run fuzzy (or a draft
    run exact) inside a batch, a linear whose sums change with the batch's rows, and logits
    rows handed to the wrong request."""
    path = make_tiny_checkpoint(tmp_path, n_layers=N_LAYERS, vocab_size=256, seed=3)
    model = load_model(path, dtype=getattr(torch, dtype))
    batched = LayerParallelDraftModel.local(model, PARALLEL, variant=variant)
    alone = LayerParallelDraftModel.local(model, PARALLEL, variant=variant)
    together, solo = batch_states(batched), batch_states(alone)
    batched.reset_stats()
    alone.reset_stats()
    got = batched.forward_batch([Segment(t, c, n) for c, t, n in together])
    want = [alone.forward(t, c, n) for c, t, n in solo]
    for g, w, (a, _, n), (b, _, _) in zip(got, want, together, solo):
        assert g.shape == (n, 256) and torch.equal(g, w)
        assert (a.length, a.exact_length) == (b.length, b.exact_length)
        assert torch.equal(a.k[:, :, : a.length], b.k[:, :, : b.length])
        assert torch.equal(a.v[:, :, : a.length], b.v[:, :, : b.length])
    # the prompt and the calibration ran exact: the plain model's own logits and KV
    for cache, rows in ((together[0][0], got[0]), (together[2][0], got[2])):
        ref = model.new_cache(64)
        n = cache.length
        assert cache.exact_length == n
        assert torch.equal(model.forward(cache.token_ids[:n], ref, rows.shape[0]), rows)
        assert torch.equal(cache.k[:, :, :n], ref.k[:, :, :n]) and torch.equal(cache.v[:, :, :n], ref.v[:, :, :n])
    counted = ("fuzzy_passes", "fuzzy_tokens", "exact_passes", "exact_tokens", "calibrations", "calibrated_tokens")
    assert {k: batched.stats()[k] for k in counted} == {k: alone.stats()[k] for k in counted}
    assert alone.stats()["calibrations"] == 1 and alone.stats()["fuzzy_passes"] == 2  # every state was there
