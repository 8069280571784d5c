"""Continuous batching: one target pass over many requests, each still what it is alone."""

from __future__ import annotations

import pytest
import torch

from protocol.messages import GenerateRequest, SamplingParams
from tests.local_draft import random_steps
from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_engine import PROMPTS, begin, make_engine, request, run
from workers.easyspec import LayerParallelDraftModel, make_layer_plan
from workers.model import load_model
from workers.model.model import ROW_WISE_MAX_T, Segment, row_spans


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("b"), vocab_size=256, seed=0)


@pytest.fixture(scope="module")
def models(tiny_dir):
    return {
        "target": load_model(tiny_dir, dtype=torch.float32),
        "quantized": load_model(tiny_dir, dtype=torch.float32, quantization="int8"),
    }


def test_row_spans_merge_batchable_segments_only():
    """Consecutive batchable segments share a call (never split, at most max_rows); the
    others keep their own; empty segments get none. A wrong merge would give a
    non-invariant linear another row count than the segment has alone."""
    assert row_spans([1, 5, 3], [True, True, True]) == [(0, 9)]
    assert row_spans([1, 5, 3], [True, False, True]) == [(0, 1), (1, 6), (6, 9)]
    assert row_spans([2, 0, 2], [True, True, True]) == [(0, 4)]
    assert row_spans([4, 4, 4], [True] * 3, max_rows=8) == [(0, 8), (8, 12)]
    assert row_spans([0, 0], [True, True]) == []


def batched_and_alone(model, prefixes, news, num_logits, seed):
    """One ragged step two ways over the same random prefixes (cached positions before the
    pass) and new tokens: one forward_batch, and each segment's forward alone. Returns the
    logits and caches of both: (batched logits, solo logits, batched caches, solo caches)."""
    gen = torch.Generator().manual_seed(seed)
    batched, alone = [model.new_cache(64) for _ in prefixes], [model.new_cache(64) for _ in prefixes]
    with torch.inference_mode():
        for n, a, b in zip(prefixes, batched, alone):
            if n:
                prompt = torch.randint(0, 256, (n,), generator=gen)
                model.forward(prompt, a, 0)
                model.forward(prompt, b, 0)
        tokens = [torch.randint(0, 256, (t,), generator=gen) for t in news]
        got = model.forward_batch([Segment(t, c, n) for t, c, n in zip(tokens, batched, num_logits)])
        want = [model.forward(t, c, n) for t, c, n in zip(tokens, alone, num_logits)]
    return got, want, batched, alone


@pytest.mark.parametrize(
    "dtype,quantization", [("float32", "none"), ("bfloat16", "none"), ("float32", "int4"), ("float32", "int8")]
)
def test_batched_forward_equals_each_segment_alone(tiny_dir, dtype, quantization):
    """A ragged batch (different cache lengths; a decode token, a verification of drafts,
    a prefill chunk longer than ROW_WISE_MAX_T, a 1-token prompt) gives every segment
    bit for bit the logits and KV it gets alone (so greedy tokens are equal). Catches
    rows attending to another request's cache or positions, a linear whose sums change
    with the batch's row count, and a wrong split of the logits rows."""
    model = load_model(tiny_dir, dtype=getattr(torch, dtype), quantization=quantization)
    num_logits = [1, 5, 0, 1, 2]
    got, want, batched, alone = batched_and_alone(model, [11, 0, 30, 4, 7], [1, 5, ROW_WISE_MAX_T + 7, 1, 3], num_logits, seed=1)
    for g, w, n in zip(got, want, num_logits):
        assert g.shape == w.shape == (n, 256) and g.dtype == torch.float32
        assert torch.equal(g, w)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
    for a, b in zip(batched, alone):
        assert a.length == b.length
        assert torch.equal(a.k[:, :, : a.length], b.k[:, :, : b.length])
        assert torch.equal(a.v[:, :, : a.length], b.v[:, :, : b.length])


def test_one_row_calls_are_made_as_batched_rows(models):
    """float32 oneDNN linears take another kernel for 1 row than for 2+ (the probe sees it):
    load_model makes their 1-row calls 2-row ones, so every linear batches every request
    and a row alone equals the same row in a batch. Catches ar steps (1 row per request)
    falling back to one call per request, or a 1-row call rounding differently."""
    model = models["target"]
    assert set(model.linear_invariance().values()) == {1}
    w2 = model.layers[0].feed_forward.w2
    x = torch.randn(8, model.args.intermediate_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        batched = w2(x)
        alone = torch.cat([w2(x[i : i + 1]) for i in range(8)])
    assert torch.equal(alone, batched)


def test_forward_batch_refuses_one_cache_twice(models):
    model = models["target"]
    cache = model.new_cache(16)
    with pytest.raises(ValueError):
        model.forward_batch([Segment(torch.tensor([1]), cache), Segment(torch.tensor([2]), cache)])


def _solo(make, requests):
    out = {}
    for r in requests:
        out.update(run(make(), [r]))
    return out


@pytest.mark.parametrize("mode", ["ar", "sd", "amusd", "easyspec"])
def test_under_load_every_output_equals_the_request_alone(models, mode):
    """Greedy and seeded sampled requests served together (batched passes of every size,
    prefills beside rounds) give token for token what each gives alone; the passes were
    batched indeed (the histogram saw more than one request per pass; in easyspec the
    layer-parallel draft's passes too: prompts, calibrations and fuzzy drafts together)."""
    steps = random_steps(3) if mode == "amusd" else None

    def make():
        if mode == "ar":
            return make_engine(models["target"], max_running=8)
        draft = models["quantized"]
        if mode == "easyspec":  # the layer-parallel draft, every layer in this process
            plan = make_layer_plan(draft.args.n_layers, 2, sequential_head=0, sequential_tail=0)  # [0, 1]
            draft = LayerParallelDraftModel.local(draft, plan)
        return make_engine(models["target"], draft, k=3, max_running=8, mode=mode, run_ahead=6, steps=steps)

    prompts = PROMPTS + [list(range(40, 70)), [3, 1, 4, 1, 5]]
    requests = [
        request(i, p, max_tokens=24, sampling=SamplingParams() if i % 2 else SamplingParams(temperature=0.8, seed=i))
        for i, p in enumerate(prompts)
    ]
    engine = make()
    together = run(engine, requests)
    alone = _solo(make, requests)
    for r in requests:
        assert together[r.request_id][0] == alone[r.request_id][0], r.request_id
    sizes = engine.batch_sizes
    assert sum(sizes.counts[1:]) > 0  # some passes held 2+ requests
    assert sizes.sum > sum(sizes.counts)  # mean batch size above 1
    if mode == "easyspec":
        draft = engine.draft.transport.engine
        assert sum(draft.batch_sizes.counts[1:]) > 0  # draft passes of 2+ requests
        stats = draft.model.stats()
        assert stats["fuzzy_passes"] > 0 and stats["calibrations"] > 0


def test_prefill_is_chunked_and_interleaves_with_decoding(models):
    """A long prompt arriving while another request decodes is prefilled in chunks, one per
    step, while the other request keeps getting tokens in those same steps (the order of
    events, not times); its output equals the one it gets alone, unchunked."""
    chunk = 16
    long_prompt = [(7 * i) % 256 for i in range(5 * chunk + 3)]
    engine = make_engine(models["target"], models["quantized"], k=2, max_running=4)
    engine.prefill_chunk = chunk
    engine.add(request(0, PROMPTS[0], max_tokens=60))
    events = []
    for _ in range(3):  # r0 is prefilled and decoding
        events += [o.request_id for o in engine.step()]
    engine.add(request(1, long_prompt, max_tokens=8))
    tokens = {"r0": [], "r1": []}
    while engine.has_work:
        r1 = [r for r in engine._running if r.request_id == "r1"]
        cached = r1[0].cache.length if r1 else None
        outs = engine.step()
        events.append(("step", cached, [o.request_id for o in outs]))
        for o in outs:
            tokens[o.request_id] += o.token_ids
    prefill_steps = [e for e in events if isinstance(e, tuple) and e[1] is not None and e[1] < len(long_prompt) - 1]
    assert len(prefill_steps) >= 5  # ceil((len - 1) / chunk) chunks, one per step
    assert all("r0" in outs for _, _, outs in prefill_steps[1:])  # r0 decoded in each of them
    alone = make_engine(models["target"], models["quantized"], k=2, max_running=4)
    alone.prefill_chunk = chunk
    assert tokens["r1"] == run(alone, [request(1, long_prompt, max_tokens=8)])["r1"][0]
    unchunked = make_engine(models["target"], models["quantized"], k=2, max_running=4)
    assert tokens["r1"] == run(unchunked, [request(1, long_prompt, max_tokens=8)])["r1"][0]


def test_draft_prefill_is_chunked_and_interleaves_with_drafting(models):
    """The draft feeds a long prompt a chunk per step_all while a running request gets a
    draft token in each of those steps; the long request's drafts equal those of a draft
    that fed its prompt whole. Catches a draft worker whose first pass over a 1,500-token
    prompt holds every other stream's drafts (sd rounds wait for them) for that long."""
    from workers.engine import DraftEngine
    from workers.engine.draft_model import PlainDraft

    chunk = 16
    long_prompt = [(7 * i) % 256 for i in range(4 * chunk + 5)]

    def engine(prefill_chunk):
        return DraftEngine(PlainDraft(models["quantized"]), max_model_len=256, max_requests=4, prefill_chunk=prefill_chunk)

    chunked = engine(chunk)
    chunked.begin(begin(PROMPTS[0], run_ahead=40, request_id="short"))
    chunked.step_all()
    chunked.begin(begin(long_prompt, run_ahead=3, request_id="long"))
    steps = []
    while chunked.has_work:
        steps.append(sorted(d.request_id for d in chunked.step_all()))
    fed_in_chunks = steps.index(["long", "short"])  # the first step that drafts for "long"
    assert fed_in_chunks == 4  # (len - 1) // chunk chunks before it, one per step
    assert all(step == ["short"] for step in steps[:fed_in_chunks])  # "short" drafted in each of them
    whole = engine(None)
    whole.begin(begin(long_prompt, run_ahead=3, request_id="long"))
    drafts = []
    while whole.has_work:
        drafts += [d.token_ids[0] for d in whole.step_all()]
    assert chunked._states["long"].sequence[len(long_prompt):] == drafts


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_per_request_draft_cap(models, mode):
    """A request's own num_draft_tokens caps its rounds' drafts (0: none, the draft never
    drafts for it) and leaves its tokens unchanged, beside requests that use the default."""
    engine = make_engine(models["target"], models["quantized"], k=4, max_running=4, mode=mode, run_ahead=8)
    capped = [GenerateRequest(f"c{n}", PROMPTS[1], 30, SamplingParams(), [], num_draft_tokens=n) for n in (0, 2)]
    out = run(engine, [request(0, PROMPTS[1], max_tokens=30), *capped])
    assert out["c0"][0] == out["c2"][0] == out["r0"][0]
    assert all(o.num_draft_tokens == 0 for o in out["c0"][2])
    assert max(o.num_draft_tokens for o in out["c2"][2]) == 2
    assert max(o.num_draft_tokens for o in out["r0"][2]) > 2


def test_abort_mid_batch_frees_its_slot_and_leaves_the_others_untouched(models):
    """A request aborted between batched steps (a client gone) gives its KV slot back at
    once; the requests batched with it finish with the tokens they get alone."""
    def make():
        return make_engine(models["target"], models["quantized"], k=3, max_running=3)

    requests = [request(i, p, max_tokens=30) for i, p in enumerate(PROMPTS[:3])]
    engine = make()
    for r in requests:
        engine.add(r)
    tokens = {r.request_id: [] for r in requests}
    for _ in range(4):
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    usage = engine.kv_cache_usage
    assert engine.abort("r1") and engine.num_running == 2
    assert engine.kv_cache_usage < usage
    engine.add(request(9, PROMPTS[3], max_tokens=5))  # the freed slot is taken at once
    first = True
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if first:
            assert engine.num_running == 3 and engine.num_waiting == 0
            first = False
    alone = _solo(make, [requests[0], requests[2]])
    assert tokens["r0"] == alone["r0"][0] and tokens["r2"] == alone["r2"][0]


def test_prompt_logprobs_across_prefill_chunks(models):
    """Prompt logprobs gathered over several prefill chunks equal the unchunked prefill's
    (row for row: an off-by-one at a chunk boundary or a chunk's scores dropped would show)."""
    prompt = [(5 * i + 3) % 256 for i in range(23)]

    def prompt_scores(chunk):
        engine = make_engine(models["target"], models["quantized"])
        engine.prefill_chunk = chunk
        message = GenerateRequest("p", prompt, 3, SamplingParams(), [], prompt_logprobs=2)
        return run(engine, [message])["p"][2][0]

    whole, chunked = prompt_scores(512), prompt_scores(5)
    assert len(chunked.prompt_logprobs) == len(prompt) - 1
    assert chunked.prompt_logprobs == pytest.approx(whole.prompt_logprobs, abs=1e-5)
    assert [[t for t, _ in row] for row in chunked.prompt_top_logprobs] == [
        [t for t, _ in row] for row in whole.prompt_top_logprobs
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batch_of_decode_steps_and_verifications_attends_in_one_kernel_call_a_layer(tiny_dir, dtype, monkeypatch):
    """A step with no prefill chunk (what a loaded server runs) takes the batched attention
    kernel, one call per layer, and every segment still gets bit for bit its solo logits and
    KV. Catches the fast path wired off, or a segment's rows or keys mixed with another's."""
    from workers.model import attend

    if not attend.usable(torch.zeros(1, 4, 16)):
        pytest.skip("no C attention kernel on this machine (qgemm unavailable)")
    model = load_model(tiny_dir, dtype=getattr(torch, dtype))
    model.fuse_layers = False  # the layer-by-layer path (float32 short passes otherwise run in
    # one kernel call, layers.c, which calls attend_segments from C: test_fused_layers.py)
    calls = []
    real = attend.attend_segments
    monkeypatch.setattr(attend, "attend_segments", lambda *a: calls.append(len(a[2])) or real(*a))
    news = [1, 5, 1, ROW_WISE_MAX_T]
    got, want, batched, alone = batched_and_alone(model, [9, 3, 20, 1], news, news, seed=3)
    assert calls == [len(news)] * model.args.n_layers
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for a, b in zip(batched, alone):
        assert torch.equal(a.k[:, :, : a.length], b.k[:, :, : b.length])
        assert torch.equal(a.v[:, :, : a.length], b.v[:, :, : b.length])
