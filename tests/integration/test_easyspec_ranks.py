"""EasySpec over 2 real rank processes (shared memory and gloo), tiny float32 model.

Each rank group costs a process start (~4 s: torch import + load), so the
correctness tests share one group per channel and switch plans with `configure`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from configs.modes import mode_of
from protocol.messages import GenerateRequest, SamplingParams
from tests.helpers import process_alive, wait_until
from workers.easyspec import DraftCheckpoint, LayerParallelDraftModel, RankError, RankPlacement, make_layer_plan
from tests.easyspec_probe import batch_states, fetch_kv
from tests.local_draft import LocalTransport
from workers.engine import DraftEngine, DraftStream, NoDraft, VerifyEngine
from workers.model import load_model
from workers.model.model import Segment
from tests.tiny_model import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
N_LAYERS = 6
PROMPT = torch.tensor([5, 17, 42, 9, 1, 3, 200, 77])
SEQUENTIAL = make_layer_plan(N_LAYERS, 2, groups=[[i] for i in range(N_LAYERS)])
PARALLEL = make_layer_plan(N_LAYERS, 2, sequential_head=1, sequential_tail=1)  # [0] [1,2] [3,4] [5]
ONE_THREAD = [RankPlacement(threads=1)] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("es-ranks"), n_layers=N_LAYERS, vocab_size=256, seed=3)
    return path, load_model(path, dtype=torch.float32)


def start(tiny, channel="shm", plan=PARALLEL, timeout_s=20.0, **kwargs) -> LayerParallelDraftModel:
    path, model = tiny
    return LayerParallelDraftModel.distributed(
        model, DraftCheckpoint(str(path), "float32"), plan, channel=channel, placements=ONE_THREAD, timeout_s=timeout_s, **kwargs
    )


@pytest.fixture(scope="module")
def groups(tiny):
    """One long-lived 2-rank draft per channel."""
    made = {}

    def get(channel):
        if channel not in made:
            made[channel] = start(tiny, channel)
        return made[channel]

    yield get
    for draft in made.values():
        draft.close()


def wait_gone(pids, timeout_s=15.0) -> bool:
    return wait_until(lambda: not any(process_alive(p) for p in pids), timeout_s)


def passes(model, cache, **kwargs):
    """A prefill of 3 tokens, then token by token (as drafting does)."""
    logits = model.forward(PROMPT[:3], cache, num_logits=3)
    for t in PROMPT[3:]:
        logits = torch.cat([logits, model.forward(t[None], cache, **kwargs)])
    return logits


# -- correctness -----------------------------------------------------------------


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_sequential_plan_on_two_ranks_equals_the_ordinary_draft_exactly(tiny, groups, channel):
    _, model = tiny
    draft = groups(channel)
    draft.configure(SEQUENTIAL, "full", split_head=False)
    ref_cache = model.new_cache(64)
    ref = passes(model, ref_cache)
    cache = draft.new_cache(64)
    logits = passes(draft, cache, exact=False)
    assert torch.equal(logits, ref)
    n = len(PROMPT)
    k, v = fetch_kv(draft, cache)
    assert torch.equal(k, ref_cache.k[:, :, :n]) and torch.equal(v, ref_cache.v[:, :, :n])
    assert torch.equal(cache.k[:, :, :n], ref_cache.k[:, :, :n])  # rank 0 ran every layer itself


@pytest.mark.parametrize("channel", ["shm", "gloo"])
@pytest.mark.parametrize("variant", ["full", "attention"])
@pytest.mark.parametrize("split_head", [False, True])
def test_fuzzy_forward_on_two_ranks_equals_the_single_process_reference(tiny, groups, channel, variant, split_head):
    _, model = tiny
    draft = groups(channel)
    draft.configure(PARALLEL, variant, split_head=split_head)
    draft.reset_stats()
    reference = LayerParallelDraftModel.local(model, PARALLEL, variant=variant)
    cache, ref_cache = draft.new_cache(64), reference.new_cache(64)
    logits = passes(draft, cache, exact=False)
    ref = passes(reference, ref_cache, exact=False)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    exact = passes(model, model.new_cache(64))
    assert (logits - exact).abs().max() > 0.1  # it is the fuzzy forward, not the exact one
    stats = draft.stats()
    k, v = fetch_kv(draft, cache)
    n = len(PROMPT)
    torch.testing.assert_close(k, ref_cache.k[:, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, ref_cache.v[:, :, :n], rtol=1e-5, atol=1e-5)
    # every exchange counted: per fuzzy pass one all-reduce per parallel group (+ a gather)
    fuzzy = stats["fuzzy_passes"]
    assert fuzzy == len(PROMPT) - 3
    assert stats["exchange"]["all_reduce"]["count"] == 2 * fuzzy
    assert stats["exchange"].get("gather", {"count": 0})["count"] == (fuzzy + 1 if split_head else 0)
    assert stats["exchange_s"] > 0


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_calibration_on_two_ranks_makes_the_verified_kv_exact(tiny, groups, channel):
    _, model = tiny
    draft = groups(channel)
    draft.configure(PARALLEL, "full", split_head=True, calibration="every_round")
    cache = draft.new_cache(64)
    drafted = [int(draft.forward(PROMPT, cache).argmax())]
    for _ in range(3):
        drafted.append(int(draft.forward(torch.tensor(drafted[-1:]), cache).argmax()))
    correction = (drafted[2] + 1) % 256
    verified = PROMPT.tolist() + drafted[:2] + [correction]
    draft.after_rollback(cache, len(PROMPT) + 2)  # the verifier's answer
    logits = draft.forward(torch.tensor([correction]), cache)  # calibration on every rank
    n = len(verified)
    exact_cache = model.new_cache(64)
    exact_logits = model.forward(torch.tensor(verified), exact_cache)
    torch.testing.assert_close(logits, exact_logits, rtol=1e-4, atol=1e-4)
    k, v = fetch_kv(draft, cache)  # parallel layers as their own ranks hold them
    torch.testing.assert_close(k, exact_cache.k[:, :, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, exact_cache.v[:, :, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channel", ["shm", "gloo"])
@pytest.mark.parametrize("split_head", [False, True])
def test_batched_step_on_two_ranks_equals_each_request_alone(tiny, groups, channel, split_head):
    """A draft step over four requests in different states (prompt, fuzzy drafting at two
    cache lengths, calibration after a rollback) is ONE command to the ranks, one all-reduce
    per parallel group for the whole batch and at most one gather; each request gets bit for
    bit the logits and KV (on both ranks) of a pass of its own, and what the single-process
    reference gives it. Catches a follower that runs the batch's jobs in another order or
    kind than rank 0 (KV or sums out of step), logits gathered for the wrong rows, and a
    step that costs a command per request."""
    _, model = tiny
    draft = groups(channel)
    draft.configure(PARALLEL, "full", split_head=split_head, calibration="every_round")
    together, solo = batch_states(draft), batch_states(draft)
    draft.reset_stats()
    got = draft.forward_batch([Segment(t, c, n) for c, t, n in together])
    exchanges = draft.stats()["exchange"]
    assert exchanges["command"]["count"] == 1
    assert exchanges["all_reduce"]["count"] == len(PARALLEL.parallel_groups)
    assert exchanges.get("gather", {"count": 0})["count"] == (1 if split_head else 0)
    want = [draft.forward(t, c, n) for c, t, n in solo]
    reference = LayerParallelDraftModel.local(model, PARALLEL)
    ref = [reference.forward(t, c, n) for c, t, n in batch_states(reference)]
    for g, w, r, (a, _, _), (b, _, _) in zip(got, want, ref, together, solo):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert (a.length, a.exact_length) == (b.length, b.exact_length)
        ka, va = fetch_kv(draft, a)
        kb, vb = fetch_kv(draft, b)
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_engine_drives_a_two_rank_draft_losslessly(tiny, groups):
    _, model = tiny
    draft = groups("shm")
    draft.configure(PARALLEL, "full", split_head=True, calibration="every_round")
    prompts = [[5, 17, 42], [200, 3, 3, 3, 9, 1, 77]]

    def serve(source):
        engine = VerifyEngine(model, source, max_model_len=128, max_running=2)
        for i, prompt in enumerate(prompts):
            engine.add(GenerateRequest(f"r{i}", prompt, 24, SamplingParams(), []))
        out: dict[str, list[int]] = {}
        while engine.has_work:
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return out

    ar = serve(NoDraft())
    engine = DraftEngine(draft, max_model_len=128, max_requests=2)
    stream = DraftStream(LocalTransport(engine), num_draft_tokens=4, max_run_ahead=4, mode=mode_of("easyspec"), timeout_s=30)
    assert serve(stream) == ar
    assert draft.healthy


# -- lifecycle -------------------------------------------------------------------


def shm_files(pid: int) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"tandem-easyspec-{pid}-")]


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_ranks_shut_down_cleanly(tiny, channel):
    draft = start(tiny, channel)
    pids = draft.executor.pids
    assert all(process_alive(p) for p in pids) and draft.healthy
    assert draft.executor.ping() < 5
    assert shm_files(os.getpid()) == []  # unlinked once every rank had it mapped
    t0 = time.monotonic()
    draft.close()
    assert time.monotonic() - t0 < 5
    assert wait_gone(pids, 1.0)
    assert not draft.healthy
    with pytest.raises(RankError, match="shut down"):
        draft.forward(PROMPT, draft.new_cache(16))
    draft.close()  # idempotent


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_a_dead_rank_is_detected(tiny, channel):
    draft = start(tiny, channel, timeout_s=30)
    try:
        cache = draft.new_cache(64)
        draft.forward(PROMPT, cache)
        os.kill(draft.executor.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RankError, match="rank"):
            draft.forward(PROMPT[:1], cache, exact=False)
        assert time.monotonic() - t0 < 5  # noticed, not waited out
        assert not draft.healthy
        with pytest.raises(RankError, match="down"):
            draft.forward(PROMPT[:1], cache, exact=False)
    finally:
        draft.close()


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_a_hung_rank_times_out(tiny, channel):
    draft = start(tiny, channel, timeout_s=2.0)
    pid = draft.executor.pids[0]
    try:
        cache = draft.new_cache(64)
        draft.forward(PROMPT, cache)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(RankError):
            draft.forward(PROMPT[:1], cache, exact=False)
        elapsed = time.monotonic() - t0
        assert 1.5 < elapsed < 10, elapsed
        assert not draft.healthy
    finally:
        os.kill(pid, signal.SIGKILL)
        draft.close()


def test_followers_exit_when_rank0_dies(tiny, tmp_path):
    path, _ = tiny
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from workers.easyspec import DraftCheckpoint, LayerParallelDraftModel, RankPlacement, make_layer_plan
        from workers.model import load_model
        model = load_model({str(path)!r}, dtype=torch.float32)
        plan = make_layer_plan({N_LAYERS}, 2, sequential_head=1, sequential_tail=1)
        draft = LayerParallelDraftModel.distributed(
            model, DraftCheckpoint({str(path)!r}, "float32"), plan, placements=[RankPlacement(threads=1)] * 2)
        print(*draft.executor.pids, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 1
    assert wait_gone(pids, 10.0)


def test_a_rank_that_fails_to_start_is_reported(tiny, tmp_path):
    _, model = tiny
    with pytest.raises(RankError, match="failed to start") as e:
        LayerParallelDraftModel.distributed(
            model, DraftCheckpoint(str(tmp_path / "missing"), "float32"), PARALLEL, placements=ONE_THREAD, timeout_s=5
        )
    assert "config.json" in str(e.value)  # the follower's own error comes along
