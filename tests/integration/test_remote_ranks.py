"""Rank groups spanning hosts: a tensor-parallel target's rank 1 (and an EasySpec draft's)
started alone with `tandem worker --role verify-rank|draft-rank --rank 1` in its own
network namespace, meeting rank 0 across a veth pair at a tcp:// rendezvous (TCPStore
served by rank 0, gloo for the tensors). Real processes, real network stacks.

The namespace tests need root and iproute2 (`ip netns`); skipped, loudly, only without them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.netns import missing_requirement, network_namespace
from configs.loader import RendezvousConfig, load_config
from tests.helpers import ONE_THREAD, REPO, TINY_EASYSPEC_SECTIONS, free_port, launch_server, tiny_pair, wait_until, write_config
from tests.integration.test_tensor_parallel import (  # the TP tests' model, passes, prompts and reference texts
    PROMPT,
    QUESTIONS,
    completions,
    engine_like_passes,
    single_device_texts,  # noqa: F401 - a fixture
    tiny,  # noqa: F401 - a fixture
)
from workers.ranks import RankError, RankPlacement
from workers.ranks.rendezvous import deployment_secret
from workers.tensor_parallel import TargetCheckpoint, TensorParallelModel

MISSING = missing_requirement()
if MISSING:  # say it where a CI log shows it, not only in -rs
    print(f"\n*** tests/integration/test_remote_ranks.py: namespace tests NOT RUN: {MISSING} ***", file=sys.stderr)
needs_netns = pytest.mark.skipif(MISSING is not None, reason=f"NOT RUN, network namespaces unavailable: {MISSING}")

TWO_RANKS = [RankPlacement(threads=1)] * 2


@pytest.fixture(scope="module")
def netns():
    with network_namespace() as namespace:
        yield namespace


def rank_config(path: Path, checkpoint, address: str, bind: str = "", key_file: Path | None = None, **sections) -> Path:
    """A TP-2 target whose rank 1 is external, meeting at `address`; CURVE on with `key_file`."""
    curve = {"enabled": True, "key_file": str(key_file), "create_missing": True} if key_file else {"enabled": False}
    return write_config(
        path,
        **tiny_pair(checkpoint),
        placement={"default": {"target": [ONE_THREAD, ONE_THREAD], "draft": ONE_THREAD}},
        tensor_parallel={"channel": "auto", "rendezvous": {"address": address, "bind": bind, "external_ranks": [1]}},
        curve=curve,
        server={"startup_timeout_s": 120, "heartbeat_timeout_s": 3},
        **sections,
    )


@contextlib.contextmanager
def external_rank(config: Path, log: Path, netns=None, role: str = "verify-rank", mode: str = "sd"):
    """`tandem worker --role ROLE --rank 1` (in `netns` if given); killed with its children afterwards."""
    argv = [sys.executable, "-m", "server.cli", "worker", "--role", role, "--rank", "1", "--config", str(config), "--mode", mode]
    command = netns.command(*argv) if netns else argv
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def rank0(checkpoint, rendezvous: RendezvousConfig, **kwargs) -> TensorParallelModel:
    return TensorParallelModel(
        TargetCheckpoint(str(checkpoint), "float32"), TWO_RANKS, torch.device("cpu"), rendezvous=rendezvous, **kwargs
    )


@needs_netns
def test_rank_in_another_namespace_gives_the_single_process_logits(tiny, netns, tmp_path):
    """TP-2 with rank 1 started alone in another network namespace (another host as far as
    TCP goes), reaching rank 0 over the veth pair; rank 0 binds 0.0.0.0 while rank 1
    connects to the host's veth address; the handshake proves the CURVE pair. Logits
    allclose to the single process (float32). Catches: gloo binding the address the host
    name resolves to (unreachable from the namespace), a bind that cannot differ from the
    connect address, an external rank that is spawned anyway or never waited for, a
    handshake that refuses the right key, a rank whose share differs from rank 0's plan;
    and, once rank 0 closes, a rank that does not come back for the next rank 0 (a
    restarted verify worker)."""
    path, model = tiny
    port = free_port()
    key = tmp_path / "keys" / "deploy.key_secret"
    config = rank_config(tmp_path / "tp.yaml", path, f"tcp://{netns.host_ip}:{port}", f"tcp://0.0.0.0:{port}", key)
    log = tmp_path / "rank.log"
    ref = engine_like_passes(model, model.new_cache(64))
    loaded = load_config(config)
    secret = deployment_secret(loaded.curve)
    with external_rank(config, log, netns):
        for attempt in range(2):  # the second: the same rank process, joining a new rank 0
            with rank0(path, loaded.tensor_parallel.rendezvous, secret=secret, startup_timeout_s=120, channel="auto") as tp:
                assert tp.channel_kind == "gloo" and tp.pids == []  # nothing spawned here
                got = engine_like_passes(tp, tp.new_cache(64))
                for a, b in zip(got, ref):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                assert tp.healthy and tp.ping() < 5, log.read_text()
    text = log.read_text()
    assert text.count("ready: following rank 0") == 2 and "refused" not in text, text


def test_a_missing_rank_times_out_with_a_clear_message(tiny):
    """Catches rank 0 waiting forever for a rank never started, or failing with torch's own
    words (a store timeout) instead of naming the rank, the address and that it is external."""
    path, _ = tiny
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RankError, match=rf"rank\(s\) \[1\] \(external: \[1\]\) did not join the rendezvous at {address} within 3 s"):
        rank0(path, RendezvousConfig(address=address, external_ranks=(1,)), startup_timeout_s=3)
    assert time.monotonic() - t0 < 30


def test_a_rank_without_the_key_pair_is_refused(tiny, tmp_path):
    """A rank whose config has CURVE off (no key pair: no proof) meets a rank 0 that holds the
    deployment's secret: it is refused, both sides say why, and rank 0's timeout names the
    refusal. Catches a handshake that admits anyone who reaches the port."""
    path, _ = tiny
    address = f"tcp://127.0.0.1:{free_port()}"
    config = rank_config(tmp_path / "nokey.yaml", path, address)
    log = tmp_path / "rank.log"
    with external_rank(config, log):
        with pytest.raises(RankError, match="rank 1 was refused: it does not hold this deployment's key pair"):
            rank0(path, RendezvousConfig(address=address, external_ranks=(1,)), secret=b"x" * 40, startup_timeout_s=25)
        assert wait_until(lambda: "refused by rank 0" in log.read_text(), 20), log.read_text()


# -- through the server ----------------------------------------------------------------


@needs_netns
@pytest.mark.parametrize("mode", ["sd", "easyspec"])
def test_served_with_a_rank_in_another_namespace(tmp_path, tiny_target_dir, netns, single_device_texts, mode, capfd):
    """`tandem serve` with a TP-2 target (sd), or a 2-rank EasySpec draft (easyspec), whose
    rank 1 runs alone in another network namespace: the greedy text of the single-device
    target. Catches: the verify (draft) worker not passing the rendezvous to its rank
    group (it would spawn rank 1 itself), the launcher not saying what it waits for, a
    draft rank that cannot follow over gloo across the veth pair."""
    port = free_port()
    address, bind = f"tcp://{netns.host_ip}:{port}", f"tcp://0.0.0.0:{port}"
    if mode == "sd":
        config = rank_config(tmp_path / "tp.yaml", tiny_target_dir, address, bind)
        role = "verify-rank"
    else:
        sections = dict(TINY_EASYSPEC_SECTIONS)
        easyspec = {**sections.pop("easyspec"), "rendezvous": {"address": address, "bind": bind, "external_ranks": [1]}}
        config = write_config(
            tmp_path / "es.yaml",
            target={"path": str(tiny_target_dir), "dtype": "float32"},
            draft={"path": str(tiny_target_dir), "dtype": "float32"},
            easyspec=easyspec, server={"startup_timeout_s": 120}, **sections,
        )  # fmt: skip
        role = "draft-rank"
    log = tmp_path / "rank.log"
    with external_rank(config, log, netns, role=role, mode=mode):
        with launch_server(config, mode=mode) as server:
            assert completions(server, QUESTIONS) == single_device_texts
            assert server.metric("tandem:spec_decode_num_draft_tokens_total") > 0
    assert f"waits up to 120 s (server.startup_timeout_s) for its external rank(s) [1] at {address}" in capfd.readouterr().out
    assert "ready: following rank 0" in log.read_text(), log.read_text()


def test_a_killed_external_rank_is_noticed_by_its_heartbeats(tiny, tmp_path):
    """An external rank's process killed while rank 0 is idle: rank 0 has no process to
    watch, so only the store heartbeats tell. Catches an external rank that is never
    supervised (a verify worker living on with a dead rank: every later pass hanging
    for the gloo timeout), and a dead rank not failing the next pass at once."""
    path, _ = tiny
    address = f"tcp://127.0.0.1:{free_port()}"
    config = rank_config(tmp_path / "tp.yaml", path, address)
    with external_rank(config, tmp_path / "rank.log"):
        with rank0(path, RendezvousConfig(address=address, external_ranks=(1,)), startup_timeout_s=60,
                   heartbeat_timeout_s=2, timeout_s=30) as tp:  # fmt: skip
            cache = tp.new_cache(64)
            tp.forward(PROMPT[:4], cache)
            assert tp.lost_ranks() == []
            os.kill(int(tp.channel.store.get("ready/1")), signal.SIGKILL)  # the rank's own process
            assert wait_until(lambda: tp.lost_ranks() == ["external rank 1: no heartbeat for 2 s"], 10), tp.lost_ranks()
            t0 = time.monotonic()
            with pytest.raises(RankError, match="rank 1"):
                tp.forward(PROMPT[4:5], cache)
            assert time.monotonic() - t0 < 5
