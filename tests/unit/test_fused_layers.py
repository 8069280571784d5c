"""DecodeLayers (workers/model/layers.py, kernels/layers.c): a pass's decoder layers in one
kernel call. For decode steps and verifications it must give bit for bit the logits and KV
entries of the Python path (the same kernels, called one by one), for every kind of linear it
plans (QLinear, a ConcatLinear of QLinears with a bias, Float32Linear with and without a bias),
every pass length up to 8, and after a rollback; a prefill chunk's rows must match the Python
path's masked pass up to rounding and not depend on what else a batch holds; and it must leave
to the Python path what it cannot compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_gguf_weights import gguf_checkpoint
from workers.model import load_model
from workers.model.layers import DecodeLayers
import workers.model.model as model_module
from workers.model.model import Segment, TransformerBlock
from workers.model.qlinear import kernel_available

pytestmark = pytest.mark.skipif(not kernel_available(), reason="the C kernels cannot be built on this machine")

# (prefill length, then pass lengths); 0: roll the cache back by 3 positions
SCHEDULE = (12, 1, 2, 3, 0, 5, 8, 1, 0, 4, 7, 6)


@pytest.fixture(scope="module", params=["gguf-qwen2", "gguf-llama", "float32", "float32-bias"])
def model(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("gguf-"):
        directory, _ = gguf_checkpoint(root, request.param.removeprefix("gguf-"))
        return load_model(directory, torch.float32, "gguf")
    return load_model(make_tiny_checkpoint(root, attention_bias=request.param.endswith("bias")), torch.float32)


def _run(model, fuse: bool) -> list[torch.Tensor]:
    """Logits of every pass of SCHEDULE (its prefill on the Python path), then the cache's keys
    and values."""
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (60,), generator=torch.Generator().manual_seed(0))
    cache, used, out = model.new_cache(64), 0, []
    with torch.inference_mode():
        for i, T in enumerate(SCHEDULE):
            if T == 0:
                cache.crop(cache.length - 3)
                continue
            model.fuse_layers = fuse and i > 0
            out.append(model.forward(tokens[used : used + T], cache, num_logits=T))
            used += T
        out += [cache.k[:, :, : cache.length].clone(), cache.v[:, :, : cache.length].clone()]
    return out


def test_fused_passes_equal_the_python_path(model):
    """Bugs caught: a part written at the wrong column, a bias dropped or added twice, RoPE rows of
    the wrong position, keys written at the wrong layer or position, a residual add missed."""
    assert model.decode_layers() is not None  # else this test would compare the Python path with itself
    python, fused = _run(model, False), _run(model, True)
    assert len(python) == len(fused)
    for a, b in zip(python, fused):
        assert torch.equal(a, b)


def test_passes_take_the_fused_path_up_to_the_prefill_end(model, monkeypatch):
    """Bug caught: the plan built but never used, or used for a prefill chunk past
    FUSED_PREFILL_END (whose row-wise attention costs more there than the masked pass)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Python layer path ran")

    model.fuse_layers = True
    monkeypatch.setattr(model_module, "FUSED_PREFILL_END", 24)
    monkeypatch.setattr(TransformerBlock, "forward", refuse)
    monkeypatch.setattr(TransformerBlock, "forward_ragged", refuse)
    cache, other = model.new_cache(64), model.new_cache(64)
    with torch.inference_mode():
        model.forward(torch.arange(20), cache)  # a prefill chunk ending by 24
        for T in (1, 8):  # decode steps and verifications, past 24 too
            model.forward(torch.arange(T), cache)
        model.forward_batch([Segment(torch.arange(2), cache), Segment(torch.arange(24), other)])
        with pytest.raises(AssertionError, match="Python layer path"):
            model.forward(torch.arange(9), cache)  # 9 rows ending past 24: the Python path
        with pytest.raises(AssertionError, match="Python layer path"):
            model.forward_batch([Segment(torch.arange(2), other), Segment(torch.arange(9), cache)])


@pytest.fixture(scope="module", params=[False, True], ids=["float32", "float32-bias"])
def float32_model(request, tmp_path_factory):
    """A model whose linears are float32 (a qgemm model rounds its rows to 8 bits, which turns the
    two attentions' float32 rounding into differences of ~1e-2 in the logits)."""
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("f32"), attention_bias=request.param), torch.float32)


def test_fused_prefill_matches_the_masked_pass(float32_model):
    """A prefill chunk in one call (row-wise attention) against the Python path's masked pass: the
    same logits and keys up to float32 rounding. Bugs caught: a row attending to the keys after
    it (or not to its own), a chunk's rows given the RoPE of another position."""
    model = float32_model
    vocab = model.args.vocab_size
    tokens = torch.randint(0, vocab, (30,), generator=torch.Generator().manual_seed(2))
    runs = []
    for fuse in (False, True):
        model.fuse_layers = fuse
        cache = model.new_cache(64)
        with torch.inference_mode():
            logits = [model.forward(tokens[:12], cache, num_logits=12), model.forward(tokens[12:], cache, num_logits=18)]
        runs.append([*logits, cache.k[:, :, :30].clone(), cache.v[:, :, :30].clone()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_batch_of_both_paths_gives_each_segment_its_solo_pass(model, monkeypatch):
    """A step with decode rows, a prefill chunk that fuses and one that does not (it ends past
    FUSED_PREFILL_END): each segment gets bit for bit its solo pass. Bugs caught: the path
    chosen for the whole batch (a chunk's bits then depend on what else the step runs), the
    two passes' logits put back in the wrong order."""
    model.fuse_layers = True
    monkeypatch.setattr(model_module, "FUSED_PREFILL_END", 24)
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in (20, 0, 16, 7)]
    steps = [torch.randint(0, vocab, (n,), generator=g) for n in (1, 12, 12, 5)]  # 2nd fuses, 3rd not

    def run(batched: bool):
        caches = [model.new_cache(64) for _ in prompts]
        with torch.inference_mode():
            for prompt, cache in zip(prompts, caches):
                if len(prompt):
                    model.forward(prompt, cache, num_logits=0)
            segments = [Segment(s, c, s.shape[0]) for s, c in zip(steps, caches)]
            logits = model.forward_batch(segments) if batched else [model.forward_batch([s])[0] for s in segments]
        return logits, caches

    (solo, solo_caches), (batched, batch_caches) = run(False), run(True)
    for a, b, ca, cb in zip(solo, batched, solo_caches, batch_caches):
        assert torch.equal(a, b)
        assert torch.equal(ca.k[:, :, : ca.length], cb.k[:, :, : cb.length])


def test_what_the_plan_cannot_compute_takes_the_python_path(tmp_path):
    """Bugs caught: a bf16 model or a layer of a kind layers.c does not know run through the
    kernel anyway (wrong dtype, or an nn.Linear's weight read as a QLinear's)."""
    directory = make_tiny_checkpoint(tmp_path)
    assert DecodeLayers.build(load_model(directory, torch.bfloat16)) is None
    model = load_model(directory, torch.float32)
    assert model.decode_layers() is not None
    wo = model.layers[1].attention.wo
    plain = nn.Linear(wo.in_features, wo.out_features, bias=False)
    plain.weight = nn.Parameter(wo.weight.detach().clone(), requires_grad=False)
    model.layers[1].attention.wo = plain
    assert DecodeLayers.build(model) is None


def test_batched_fused_pass_equals_solo_passes(model):
    """forward_batch through the plan: each segment (its own cache, length and row count, up to
    8 rows) gets bit for bit its solo pass's logits and keys. Bugs caught: a segment's RoPE rows
    or cache pointers taken from another segment, rows of a qgemm call past 8 dropped, a
    segment's keys written into its neighbour's cache."""
    model.fuse_layers = True
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in (5, 13, 9, 20)]
    steps = [torch.randint(0, vocab, (n,), generator=g) for n in (1, 8, 3, 6)]  # 18 rows: three qgemm calls
    with torch.inference_mode():
        solo, caches = [], []
        for prompt, step in zip(prompts, steps):
            cache = model.new_cache(64)
            model.forward(prompt, cache, num_logits=0)
            caches.append(cache)
            solo.append(model.forward(step, cache, num_logits=step.shape[0]))
        batch_caches = []
        for prompt in prompts:
            cache = model.new_cache(64)
            model.forward(prompt, cache, num_logits=0)
            batch_caches.append(cache)
        batched = model.forward_batch([Segment(s, c, s.shape[0]) for s, c in zip(steps, batch_caches)])
    for a, b, ca, cb in zip(solo, batched, caches, batch_caches):
        assert torch.equal(a, b)
        assert ca.length == cb.length
        assert torch.equal(ca.k[:, :, : ca.length], cb.k[:, :, : cb.length])
        assert torch.equal(ca.v[:, :, : ca.length], cb.v[:, :, : cb.length])
