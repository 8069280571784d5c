"""The channels' protocol, with two ranks as threads of this process (fast)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import torch

from workers.ranks.channel import (
    DistChannel,
    DistRendezvous,
    ExchangeStats,
    RankError,
    ShmChannel,
    ShmLayout,
    shm_directory,
)
from workers.easyspec.fuzzy import vocab_bounds


@pytest.fixture
def pair():
    path = os.path.join(shm_directory(), f"tandem-easyspec-test-{uuid.uuid4().hex[:8]}")
    # root_pid: the follower's "is rank 0 alive" check compares it with its parent pid
    spec = ShmLayout(path, 2, 4096, 64, timeout_s=0.5, root_pid=os.getppid())
    bell = threading.Semaphore(0)
    root = ShmChannel(spec, 0, [bell])
    follower = ShmChannel(spec, 1, [bell])
    yield root, follower
    follower.close()
    root.close()
    assert not os.path.exists(path)


def on_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_commands_arrive_in_order(pair):
    root, follower = pair
    t, out = on_thread(lambda: [follower.recv_command() for _ in range(3)])
    root.send_command([1, 2, 3])
    root.send_command(list(range(60)))
    root.send_command([7])
    t.join(5)
    assert out["value"] == [[1, 2, 3], list(range(60)), [7]]
    with pytest.raises(ValueError, match="exceeds"):
        root.send_command(list(range(65)))
    assert root.stats.count["command"] == 3


def test_all_reduce_sums_in_rank_order_and_gather_collects(pair):
    root, follower = pair
    a = torch.randn(3, 8, dtype=torch.bfloat16)
    b = torch.randn(3, 8, dtype=torch.bfloat16)
    want = a + b

    def follow():
        results = []
        for _ in range(3):  # the double-buffered slots are reused
            x = b.clone()
            results.append(follower.all_reduce_(x))
        assert follower.gather(torch.full((2, 4), 5.0)) is None
        follower.barrier()
        return results

    t, out = on_thread(follow)
    mine = [root.all_reduce_(a.clone()) for _ in range(3)]
    parts = root.gather(torch.full((2, 4), 1.0))
    root.barrier()
    t.join(5)
    assert "error" not in out, out.get("error")
    for x in mine + out["value"]:
        assert torch.equal(x, want)  # bitwise: same order of summation as a + b
    assert torch.equal(parts[0], torch.full((2, 4), 1.0)) and torch.equal(parts[1], torch.full((2, 4), 5.0))
    assert root.stats.count == {"all_reduce": 3, "gather": 1, "barrier": 1}
    assert root.stats.bytes["all_reduce"] == 3 * a.numel() * 2
    with pytest.raises(ValueError, match="exceeds the channel's slot"):
        root.all_reduce_(torch.zeros(4096))


def test_a_silent_peer_times_out(pair):
    root, _ = pair
    t0 = time.monotonic()
    with pytest.raises(RankError, match="no answer within"):
        root.all_reduce_(torch.ones(4))
    assert 0.4 < time.monotonic() - t0 < 3


def test_a_command_to_a_follower_that_is_not_listening_times_out_on_gloo(tmp_path):
    """gloo sends only once the peer has posted its receive; a stopped follower must not
    hold rank 0 for the followers' week-long idle timeout (it once hung CI for 90 min)."""
    spec = DistRendezvous(f"file://{tmp_path / 'rendezvous'}", 2, "gloo", timeout_s=1.0)
    made = [on_thread(lambda r=r: DistChannel(spec, r, torch.device("cpu"))) for r in (0, 1)]
    for t, _ in made:
        t.join(30)
    root, follower = (out["value"] for _, out in made)
    try:
        t0 = time.monotonic()
        t, out = on_thread(lambda: root.send_command([7, 8, 9]))
        t.join(15)  # a bounded wait: the bug is a hang inside C++, out of pytest-timeout's reach
        assert not t.is_alive(), "rank 0's command send did not time out"
        assert isinstance(out.get("error"), RankError), out
        assert 0.8 < time.monotonic() - t0 < 10
    finally:
        follower.close()
        root.close()


def test_a_dead_peer_is_reported_by_the_liveness_check(pair):
    root, _ = pair

    def dead():
        raise RankError("rank 1 (pid 1) failed, exit code -9")

    root._check_peers = dead
    with pytest.raises(RankError, match="exit code -9"):
        root.barrier()


def test_exchange_stats_snapshot():
    stats = ExchangeStats()
    stats.add("all_reduce", 0.5, 100)
    stats.add("all_reduce", 0.25, 100)
    stats.add("command", 0.125, 8)
    assert stats.snapshot() == {
        "all_reduce": {"count": 2, "seconds": 0.75, "bytes": 200},
        "command": {"count": 1, "seconds": 0.125, "bytes": 8},
    }
    assert stats.total_count == 3 and stats.total_seconds == 0.875
    stats.reset()
    assert stats.snapshot() == {}


def test_vocab_shards_cover_the_vocabulary():
    for vocab, world in [(49152, 2), (256, 2), (32000, 3), (100, 4)]:
        bounds = vocab_bounds(vocab, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == vocab
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert vocab_bounds(49152, 2) == [(0, 24576), (24576, 49152)]
