"""Prefix caching: requests that share a prompt prefix reuse its KV (target and draft), and
every output stays bit for bit what the request gets from a cold engine."""

from __future__ import annotations

import pytest
import torch

from protocol.messages import GenerateRequest, SamplingParams
from tests.local_draft import random_steps
from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_engine import make_engine, request, run
from workers.engine.prefix_cache import KVPool, reusable_prefix
from workers.model import load_model

CHUNK = 16
SYSTEM = [(5 * i + 3) % 256 for i in range(2 * CHUNK + 5)]  # a shared "system prompt" of 37 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("p"), vocab_size=256, seed=0)
    return {
        "target": load_model(directory, dtype=torch.float32),
        "quantized": load_model(directory, dtype=torch.float32, quantization="int8"),
    }


def test_reusable_prefix_only_at_boundaries_both_prefills_share():
    """Reuse stops at a multiple of the chunk within the common prefix and both prefills,
    or takes a whole prefill that ends where the new one ends. Catches reuse at an
    unaligned cut (KV that a cold prefill rounds differently), past the source's prefill
    (positions its decode passes computed), or past the new prompt's prefill end."""
    a = list(range(50))
    assert reusable_prefix(a, 49, a[:40] + [99] * 10, 49, 16) == 32  # parts at 40: the chunk below
    assert reusable_prefix(a, 49, a, 49, 16) == 49  # the same prompt: its whole prefill
    assert reusable_prefix(a, 20, a, 49, 16) == 16  # the source's prefill ended at 20 (decode after it)
    assert reusable_prefix(a[:30], 49, a, 49, 16) == 16  # the source is still prefilling (30 computed)
    assert reusable_prefix(a, 49, a[:36], 35, 16) == 32  # a shorter prompt: not past its own prefill
    assert reusable_prefix(a, 49, [7] + a[1:], 49, 16) == 0  # the first token differs
    assert reusable_prefix(a[:10], 9, a[:10], 9, 16) == 9  # a short prompt again, whole
    assert reusable_prefix(a[:10], 9, a[:12], 11, 16) == 0  # a short shared prefix, prompts of other lengths


def test_pool_hands_out_the_longest_prefix_then_new_caches_then_the_least_recent():
    """Catches: evicting a cache that holds a prefix while a new one may still be made, a
    cache handed out uncropped (stale tail), ties not going to the least recently used."""

    class Cache:
        def __init__(self):
            self.length = 0

        def crop(self, n):
            self.length = n

    pool = KVPool(Cache, size=3, chunk=4, prefix_caching=True)
    first, _ = pool.acquire([1, 2, 3, 4, 5, 6], 5)
    second, _ = pool.acquire([9, 9, 9, 9, 9, 9], 5)
    first.length = second.length = 6
    pool.release(first, [1, 2, 3, 4, 5, 6], 5)
    pool.release(second, [9, 9, 9, 9, 9, 9], 5)
    third, reused = pool.acquire([7] * 6, 5)
    assert reused == 0 and third not in (first, second)  # a new cache: the two prefixes stay
    got, reused = pool.acquire([1, 2, 3, 4, 8, 8, 8], 6)
    assert got is first and reused == 4 and got.length == 4
    third.length = 6
    pool.release(third, [7] * 6, 5)
    got, reused = pool.acquire([0] * 6, 5)
    assert got is second and reused == 0 and got.length == 0  # no match, all made: the least recent


def _cold(models, mode, requests, **kwargs):
    """Each request alone on an engine without prefix caching."""
    out = {}
    for r in requests:
        out.update(run(_engine(models, mode, prefix_caching=False, **kwargs), [r]))
    return {rid: tokens for rid, (tokens, _, _) in out.items()}


def _engine(models, mode, prefix_caching=True, max_running=4):
    if mode == "ar":
        return make_engine(models["target"], max_running=max_running, prefix_caching=prefix_caching,
                           prefill_chunk=CHUNK)
    steps = random_steps(3) if mode == "amusd" else None
    return make_engine(models["target"], models["quantized"], k=3, max_running=max_running, mode=mode, run_ahead=6,
                       steps=steps, prefix_caching=prefix_caching, prefill_chunk=CHUNK)


def _sampling(i):
    return SamplingParams() if i % 2 else SamplingParams(temperature=0.8, seed=i)


def _draft_engine(engine):
    return engine.draft.transport.engine


@pytest.mark.parametrize("mode", ["ar", "sd", "amusd"])
def test_shared_system_prompt_hits_and_outputs_equal_cold_runs(models, mode):
    """Requests with one system prompt, one after another (free caches reused) and then
    together with n > 1 copies of one prompt (running caches copied): the target and the
    draft count hits, and every output (greedy and seeded sampling) equals the request
    served alone by an engine without prefix caching. Catches reused KV that differs from
    a cold prefill, a stale tail left past the reused prefix, hits never happening."""
    tails = [[200, 1, 2], [201, 7], [202, 9, 9, 9, 4], [11] * 20]
    one_by_one = [request(i, SYSTEM + tail, max_tokens=12, sampling=_sampling(i)) for i, tail in enumerate(tails)]
    together = [request(10 + i, SYSTEM + [77, 78], max_tokens=12, sampling=_sampling(i)) for i in range(3)]
    engine = _engine(models, mode)
    got = {}
    for r in one_by_one:
        got.update({rid: t for rid, (t, _, _) in run(engine, [r]).items()})
    hits = engine.prefix_cache_hits
    assert hits == 2 * CHUNK * (len(one_by_one) - 1)  # each later one takes the two whole chunks
    got.update({rid: t for rid, (t, _, _) in run(engine, together).items()})
    # each takes two chunks from a free cache; the first computes the rest, the others wait a step and copy it
    assert engine.prefix_cache_hits - hits == 2 * CHUNK + 2 * (len(SYSTEM + [77, 78]) - 1)
    assert engine.prefix_cache_queries == sum(len(r.prompt_ids) - 1 for r in one_by_one + together)
    if mode != "ar":
        draft = _draft_engine(engine)
        assert draft.prefix_cache_hits >= 2 * CHUNK * (len(one_by_one) - 1)
        assert draft.prefix_cache_queries == engine.prefix_cache_queries
    assert got == _cold(models, mode, one_by_one + together)


def test_a_slot_reused_for_another_prompt_is_cropped(models):
    """One slot serves, in turn, a long prompt, a prompt sharing only its first chunk
    (the stale positions past it are overwritten), and an unrelated one (nothing
    reused): each output equals its cold run. Catches a cache handed on with its old
    length, or positions of the earlier prompt read as the new one's."""
    first = SYSTEM + [50] * 20
    partial = SYSTEM[:CHUNK + 3] + [60] * 30
    unrelated = [(11 * i) % 256 for i in range(45)]
    requests = [request(i, p, max_tokens=10, sampling=_sampling(i)) for i, p in enumerate([first, partial, unrelated])]
    engine = _engine(models, "sd", max_running=1)
    got = {}
    for r in requests:
        got.update({rid: t for rid, (t, _, _) in run(engine, [r]).items()})
    assert engine.prefix_cache_hits == CHUNK
    assert got == _cold(models, "sd", requests, max_running=1)


def test_abort_mid_prefill_frees_the_slot_and_keeps_what_it_computed(models):
    """A request aborted after its first prefill chunk gives its slot back; the next request
    with the same prompt reuses that chunk and gets the cold output; the draft forgot it.
    Catches a slot lost on abort, or a half-filled cache offered past what it computed."""
    prompt = SYSTEM + [90] * 30
    engine = _engine(models, "sd", max_running=1)
    engine.add(request(0, prompt, max_tokens=10))
    engine.step()  # the first chunk
    assert engine.abort("r0")
    assert "r0" not in _draft_engine(engine)._states
    again = request(1, prompt, max_tokens=10)
    got = run(engine, [again])
    assert engine.prefix_cache_hits == CHUNK
    assert got["r1"][0] == _cold(models, "sd", [again], max_running=1)["r1"]


def test_prompt_logprobs_are_computed_whole_after_a_hit(models):
    """A request for prompt logprobs takes no cached prefix (its rows need the logits): it
    gets one per prompt token after the first, as without a cache. Catches a hit skipping
    the rows a client asked to score."""
    prompt = SYSTEM + [3, 4]
    engine = _engine(models, "ar")
    run(engine, [request(0, prompt, max_tokens=2)])
    asked = GenerateRequest("p", prompt, 2, SamplingParams(), [], prompt_logprobs=1)
    scored = run(engine, [asked])["p"][2][0].prompt_logprobs
    cold = run(_engine(models, "ar", prefix_caching=False), [asked])["p"][2][0].prompt_logprobs
    assert len(scored) == len(prompt) - 1 and scored == cold
    assert engine.prefix_cache_queries == len(prompt) - 1  # the scored one was no query


def test_draft_requests_begun_together_share_chunks_and_draft_as_cold(models):
    """Two draft requests with one long prompt, begun together: the second skips the chunk
    the first computes in the same pass and copies it next pass, and each drafts what a
    draft without prefix caching drafts for it alone (float32, greedy). Catches a copied
    chunk that differs from the computed one, the whole prompt taken (its logits are
    needed), or both computing every chunk."""
    from protocol.messages import BeginDrafting
    from workers.engine import DraftEngine
    from workers.engine.draft_model import PlainDraft

    prompt = SYSTEM + [70] * 12  # 49 tokens: chunks [0, 16), [16, 32), [32, 48), then [48, 49) drafts

    def drafts(engine, ids):
        for rid in ids:
            engine.begin(BeginDrafting(rid, 0, prompt, 4, SamplingParams(), num_prompt_tokens=len(prompt)))
        while engine.has_work:
            engine.step_all()
        return {rid: engine._states[rid].sequence[len(prompt):] for rid in ids}

    def make(caching):
        return DraftEngine(PlainDraft(models["quantized"]), max_model_len=128, max_requests=4, prefill_chunk=CHUNK,
                           prefix_caching=caching)

    shared = make(True)
    got = drafts(shared, ["a", "b"])
    assert shared.prefix_cache_hits == 3 * CHUNK  # b copied every chunk, fed only the last token itself
    assert shared.prefix_cache_queries == 2 * (len(prompt) - 1)
    assert got["a"] == got["b"] == drafts(make(False), ["a"])["a"] and len(got["a"]) == 4

