"""A tensor-parallel target over 2 real rank processes (shared memory and gloo), tiny float32
models: logits against the single-process model, failures, and greedy output through the
real server (launcher, workers, ZeroMQ, uvicorn, the OpenAI SDK) in ar, sd and easyspec."""

from __future__ import annotations

import os
import signal
import time

import openai
import pytest
import torch

from tests.helpers import ONE_THREAD, TINY_EASYSPEC_SECTIONS, launch_server, process_alive, wait_healthy, wait_until, write_config
from tests.tiny_model import make_tiny_checkpoint
from workers.model import load_model
from workers.model.model import ROW_WISE_MAX_T, Segment
from workers.ranks import RankError, RankPlacement
from workers.tensor_parallel import TargetCheckpoint, TensorParallelModel

PROMPT = torch.tensor([5, 17, 42, 9, 1, 3, 200, 77, 4, 8, 9, 10, 11, 12])
TWO_RANKS = [RankPlacement(threads=1)] * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 KV heads (2 + 1 over the ranks) and biases on every attention projection."""
    path = make_tiny_checkpoint(
        tmp_path_factory.mktemp("tp"), n_layers=3, dim=96, n_heads=6, n_kv_heads=3,
        intermediate_size=160, vocab_size=256, seed=2, attention_bias=True,
    )
    return path, load_model(path, dtype=torch.float32)


def start(path, channel="shm", **kwargs) -> TensorParallelModel:
    return TensorParallelModel(TargetCheckpoint(str(path), "float32"), TWO_RANKS, torch.device("cpu"), channel=channel, **kwargs)


def engine_like_passes(model, cache) -> list[torch.Tensor]:
    """What the verify engine does: a prefill, decode steps, a rollback, a verification of 3."""
    out = [model.forward(PROMPT[:10], cache, 10)]
    for t in PROMPT[10:12]:
        out.append(model.forward(t[None], cache))
    cache.crop(8)  # a rejected draft: the next pass starts at 8
    out.append(model.forward(PROMPT[8:11], cache, 3))
    return out


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_two_ranks_give_the_single_process_logits(tiny, channel):
    """TP-2 over real processes allclose to the single-process model (float32); catches a
    follower that does not follow a rollback (its cache would hold other tokens), a missing
    NewCache, a reduce over the wrong bytes, or a chunked all-reduce that drops a piece
    (the 10-token prefill is split in chunks when the channel is shared memory)."""
    path, model = tiny
    ref = engine_like_passes(model, model.new_cache(64))
    with start(path, channel) as tp:
        got = engine_like_passes(tp, tp.new_cache(64))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        stats = tp.stats.snapshot()
        assert stats["all_reduce"]["count"] >= 2 * 3 * len(ref)  # 2 per layer per pass (more if chunked)
        assert tp.all_reduces_per_pass == 6
        assert tp.healthy and tp.ping() < 5


@pytest.mark.parametrize("channel", ["shm", "gloo"])
def test_a_batched_pass_on_two_ranks_equals_each_request_alone(tiny, channel):
    """A ragged batch over TP-2 (different cache lengths; a decode token, a verification of
    drafts, a prefill chunk longer than ROW_WISE_MAX_T, a 1-token prompt) is ONE command and
    one all-reduce per row-parallel linear for all its rows; each request gets bit for bit
    its logits from a TP pass of its own, allclose to the single-process model, the same
    greedy tokens, and the followers' caches follow (the next pass of every request still
    equals). Catches a follower running the batch as other segments than rank 0, a reduce
    over the wrong rows, and a step that costs a command or an all-reduce per request."""
    path, model = tiny
    gen = torch.Generator().manual_seed(4)
    prefixes = [11, 0, 30, 4, 7]
    news = [1, 4, ROW_WISE_MAX_T + 7, 1, 3]
    num_logits = [1, 4, 0, 1, 3]
    prompts = [torch.randint(0, 256, (n,), generator=gen) for n in prefixes]
    tokens = [torch.randint(0, 256, (t,), generator=gen) for t in news]
    nexts = [torch.randint(0, 256, (1,), generator=gen) for _ in news]
    with start(path, channel) as tp:
        runs = {}
        for name, m in (("batched", tp), ("alone", tp), ("single", model)):
            caches = [m.new_cache(64) for _ in prefixes]
            for prompt, cache in zip(prompts, caches):
                if len(prompt):
                    m.forward(prompt, cache, 0)
            runs[name] = caches
        before = tp.stats.snapshot()
        got = tp.forward_batch([Segment(t, c, n) for t, c, n in zip(tokens, runs["batched"], num_logits)])
        after = tp.stats.snapshot()
        assert after["command"]["count"] - before["command"]["count"] == 1
        assert after["all_reduce"]["count"] - before["all_reduce"]["count"] == tp.all_reduces_per_pass
        want = [tp.forward(t, c, n) for t, c, n in zip(tokens, runs["alone"], num_logits)]
        ref = [model.forward(t, c, n) for t, c, n in zip(tokens, runs["single"], num_logits)]
        for g, w, r, n in zip(got, want, ref, num_logits):
            assert g.shape == (n, 256) and torch.equal(g, w)
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
            assert torch.equal(g.argmax(-1), r.argmax(-1))
        for t, a, b in zip(nexts, runs["batched"], runs["alone"]):
            assert a.length == b.length
            assert torch.equal(tp.forward(t, a), tp.forward(t, b))


def test_a_dead_rank_takes_the_group_down_at_once(tiny):
    """Catches a dead follower hanging rank 0 (a verify worker stuck forever) instead of RankError,
    and `fatal` not ending the process (the launcher restarts a verify worker that exits)."""
    path, _ = tiny
    with start(path, timeout_s=30) as tp:
        cache = tp.new_cache(64)
        tp.forward(PROMPT[:4], cache)
        os.kill(tp.pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RankError, match="rank 1"):
            tp.forward(PROMPT[4:5], cache)
        assert time.monotonic() - t0 < 5
        assert not tp.healthy
        tp.fatal = True
        with pytest.raises(SystemExit):
            tp.forward(PROMPT[4:5], cache)


def test_close_stops_every_rank(tiny):
    """Catches followers left running after their group is closed."""
    path, _ = tiny
    tp = start(path)
    pids = tp.pids
    assert all(process_alive(p) for p in pids)
    tp.close()
    assert wait_until(lambda: not any(process_alive(p) for p in pids), 10)


# -- through the server ----------------------------------------------------------------

QUESTIONS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away,"]


def completions(server, prompts, max_tokens=24) -> list[str]:
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    return [
        sdk.completions.create(model="tiny", prompt=p, max_tokens=max_tokens, temperature=0).choices[0].text
        for p in prompts
    ]


@pytest.fixture(scope="module")
def single_device_texts(tmp_path_factory, tiny_target_dir):
    config = write_config(
        tmp_path_factory.mktemp("tp-ar") / "ar.yaml",
        target={"path": str(tiny_target_dir), "dtype": "float32"},
        draft={"path": str(tiny_target_dir), "dtype": "float32"},
    )
    with launch_server(config, mode="ar") as server:
        return completions(server, QUESTIONS)


@pytest.mark.parametrize("mode", ["ar", "sd", "easyspec"])
def test_tp2_target_through_the_server_gives_the_single_device_text(tmp_path, tiny_target_dir, single_device_texts, mode):
    """A TP-2 target (placement.target a list of 2) served in ar, sd and easyspec gives the
    greedy text of the single-device target. Catches the verify worker not building the
    tensor-parallel model, a follower out of step with rank 0 across requests and rounds
    (rollbacks, cache reuse), and in easyspec both rank groups (target and draft) on the
    same devices getting in each other's way. The draft is an int8 copy in sd (drafts that
    part from the target: rollbacks). In ar, also a target rank killed while idle: catches a
    verify worker that lives on with a dead rank (every later request failing) instead of
    exiting for the launcher to restart it with its ranks."""
    two = [ONE_THREAD, ONE_THREAD]
    sections = TINY_EASYSPEC_SECTIONS if mode == "easyspec" else {}
    placement = {key: dict(value) for key, value in sections.get("placement", {"default": {"draft": ONE_THREAD}}).items()}
    placement["default"]["target"] = two
    config = write_config(
        tmp_path / "tp2.yaml",
        target={"path": str(tiny_target_dir), "dtype": "float32"},
        draft={"path": str(tiny_target_dir), "dtype": "float32", "quantization": "none" if mode == "easyspec" else "int8"},
        **{**sections, "placement": placement},
    )
    with launch_server(config, mode=mode) as server:
        assert completions(server, QUESTIONS) == single_device_texts
        rank = _target_rank(server)
        assert rank is not None
        if mode != "ar":
            assert server.metric("tandem:spec_decode_num_draft_tokens_total") > 0
            return
        # a target rank killed while idle: the verify worker exits with it and comes back whole
        os.kill(rank, signal.SIGKILL)
        assert wait_until(lambda: server.metric("tandem:worker_restarts_total", role="verify") >= 1, 60)
        assert wait_until(lambda: _target_rank(server) not in (None, rank), 120)
        wait_healthy(server)
        assert completions(server, QUESTIONS[:1]) == single_device_texts[:1]


def _target_rank(server) -> int | None:
    """The pid of the verify worker's tensor-parallel rank 1 (tandem-tp1), if there is one."""
    verify = [p for p in server.worker_pids() if _comm(str(p)) == "tandem-verify"]
    ranks = [int(p) for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "tandem-tp1" and _parent(p) in verify]
    return ranks[0] if len(verify) == 1 and len(ranks) == 1 else None


def _comm(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


def _parent(pid: str) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
