"""The rendezvous of rank groups spanning hosts (workers/ranks/rendezvous.py) on an in-process
store, and its config keys: what is admitted, what is refused and why."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch.distributed as dist

from configs.loader import ConfigError, load_config
from workers.ranks import RankError
from workers.ranks.rendezvous import Admission, introduce, local_address_towards, split_address

SECRET = b"s" * 40
TP2 = Path(__file__).resolve().parents[2] / "configs" / "cpu-tp2.yaml"


def claim(store, rank, identity="model A", secret=SECRET):
    """introduce() on a thread (rank 0 admits meanwhile): the thread and its result, "ok" or the refusal."""
    result = {}

    def go():
        try:
            introduce(store, rank, identity, secret, timeout_s=10)
            result["verdict"] = "ok"
        except RankError as e:
            result["verdict"] = str(e)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, result


def admit_until_done(admission, thread) -> None:
    while thread.is_alive():
        admission.admit_pending()
        thread.join(0.02)


@pytest.mark.parametrize(
    "identity, secret, refusal",
    [
        ("model A", SECRET, None),
        ("model A", b"t" * 40, "does not hold this deployment's key pair"),
        ("model A", None, "does not hold this deployment's key pair"),
        ("model B", SECRET, "it runs model B, rank 0 runs model A"),
    ],
)
def test_a_rank_is_admitted_only_with_the_secret_and_rank_0s_program(identity, secret, refusal):
    """Catches a handshake that admits a rank without the deployment's key (anyone who reaches
    the port), or one that runs another model or split (wrong output, or a hang mid-pass)."""
    store = dist.HashStore()
    admission = Admission(store, 2, "model A", SECRET)
    thread, result = claim(store, 1, identity, secret)
    admit_until_done(admission, thread)
    if refusal is None:
        assert result["verdict"] == "ok" and admission.admitted == {1}
    else:
        assert refusal in result["verdict"] and refusal in admission.refusals[1] and not admission.admitted
        assert not store.check(["hello/1"])  # the rank is free again for the right process


def test_a_rank_claimed_twice_is_refused_to_the_second():
    """Catches two processes started as the same rank both joining (a group out of step)."""
    store = dist.HashStore()
    admission = Admission(store, 3, "m", None)
    first, first_result = claim(store, 2, "m", None)
    admit_until_done(admission, first)
    with pytest.raises(RankError, match="rank 2 is already taken"):
        introduce(store, 2, "m", None, timeout_s=5)
    assert first_result["verdict"] == "ok"


def test_the_local_address_is_the_one_that_routes_to_rank_0():
    """Catches gloo binding an address the other ranks cannot reach (the host name's)."""
    assert local_address_towards("127.0.0.1", 29500) == "127.0.0.1"
    assert split_address("tcp://gpu-box:29500") == ("gpu-box", 29500)
    assert split_address("tcp://[::1]:29500") == ("::1", 29500)


@pytest.mark.parametrize(
    "rendezvous, message",
    [
        ({"external_ranks": [1]}, "external_ranks: needs tensor_parallel.rendezvous.address"),
        ({"address": "gpu-box:29500"}, "address: expected tcp://HOST:PORT"),
        ({"address": "tcp://h:1", "external_ranks": [0]}, "distinct ranks >= 1"),
        ({"address": "tcp://h:1", "external_ranks": [2]}, "makes a group of 2 ranks (0..1)"),
        ({"bind": "tcp://0.0.0.0:1"}, "bind: needs tensor_parallel.rendezvous.address"),
    ],
)
def test_bad_rendezvous_settings_are_refused_by_name(rendezvous, message):
    """Catches a rendezvous that could never work being found out only at start-up, on the GPU box."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TP2, tensor_parallel__rendezvous=rendezvous)


def test_shared_memory_cannot_reach_other_hosts():
    """Catches a group across hosts configured on the shared-memory channel (it would wait forever)."""
    with pytest.raises(ConfigError, match="shm cannot reach ranks on other hosts"):
        load_config(TP2, tensor_parallel__channel="shm",
                    tensor_parallel__rendezvous={"address": "tcp://h:1", "external_ranks": [1]})  # fmt: skip
