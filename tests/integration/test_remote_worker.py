"""A draft worker on "another host": `tandem worker --role draft` in its own
network namespace, reaching `tandem serve --external draft` over tcp:// across a
veth pair, with CURVE on. Real processes, real network stacks, the OpenAI SDK.

Needs root and iproute2 (`ip netns`); skipped, loudly, only without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.helpers import (
    REPO,
    RunningServer,
    free_port,
    launch_server,
    stop_server,
    tiny_pair,
    wait_healthy,
    wait_until,
    write_config,
)
from bench.netns import missing_requirement, network_namespace

MISSING = missing_requirement()
if MISSING:  # say it where a CI log shows it, not only in -rs
    print(f"\n*** tests/integration/test_remote_worker.py NOT RUN: {MISSING} ***", file=sys.stderr)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"NOT RUN, network namespaces unavailable: {MISSING}")

PROMPTS = ["Once upon a time, in a land far away,", "def add(a, b):"]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def netns():
    with network_namespace() as namespace:
        yield namespace


def config_with_external(path: Path, tiny_target_dir, netns, external: str) -> Path:
    """The tiny pair; the `external` role's inbox in the namespace, the others on
    this side of the veth pair; every process binds 0.0.0.0 (bind differs from
    the address the others connect to); CURVE on, the pair made on first use."""
    ports = {role: free_port() for role in ("server", "verify", "draft")}
    hosts = {role: netns.ns_ip if role == external else netns.host_ip for role in ports}
    return write_config(
        path,
        **tiny_pair(tiny_target_dir),
        speculation={"mode": "sd", "num_draft_tokens": 4, "draft_timeout_s": 3},
        server={"heartbeat_timeout_s": 2, "startup_timeout_s": 120, "shutdown_grace_s": 5},
        addresses={
            **{role: f"tcp://{hosts[role]}:{port}" for role, port in ports.items()},
            "bind": {role: f"tcp://0.0.0.0:{port}" for role, port in ports.items()},
        },
        curve={"enabled": True, "key_file": str(path.parent / "keys" / "deploy.key_secret"), "create_missing": True},
    )


@pytest.fixture
def remote_config(tmp_path, tiny_target_dir, netns):
    return config_with_external(tmp_path / "remote.yaml", tiny_target_dir, netns, "draft")


@pytest.fixture(scope="module")
def local_outputs(tmp_path_factory, tiny_target_dir):
    """The all-local run: the target alone (ar), every process on this host over ipc://."""
    config = write_config(
        tmp_path_factory.mktemp("local") / "local.yaml",
        **tiny_pair(tiny_target_dir),
    )
    with launch_server(config, mode="ar") as server:
        return [complete(server, prompt).choices[0].text for prompt in PROMPTS]


def complete(server: RunningServer, prompt: str):
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    return sdk.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)


def start_worker(netns, config: Path, log: Path, role: str = "draft") -> subprocess.Popen:
    """`tandem worker --role ROLE` inside the namespace."""
    command = netns.command(
        sys.executable, "-m", "server.cli", "worker", "--role", role, "--config", str(config), "--mode", "sd"
    )
    return subprocess.Popen(command, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT)


@contextlib.contextmanager
def external_draft_server(config: Path, log: Path, external: str = "draft"):
    """`tandem serve --external ROLE`, its log in `log`; healthy once the role connects."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
               "--mode", "sd", "--external", external]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=log.open("a"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    server = RunningServer(process, port)
    try:
        yield server
    finally:
        stop_server(server)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def drafted(server, prompt=PROMPTS[0]) -> tuple[str, int]:
    reply = complete(server, prompt)
    return reply.choices[0].text, reply.model_extra["speculation"]["num_draft_tokens"]


def test_remote_draft_over_veth_equals_local_run(remote_config, netns, tmp_path, local_outputs):
    """Catches: a worker that cannot run alone or cannot reach the server across
    hosts (bind vs connect addresses, tcp, CURVE between processes), a server
    that starts a draft of its own despite --external, and any loss: the greedy
    outputs must equal the all-local target's, with drafts verified."""
    log = tmp_path / "run.log"
    worker = start_worker(netns, remote_config, log)
    try:
        with external_draft_server(remote_config, log) as server:
            wait_healthy(server, timeout_s=180)
            assert not [p for p in server.worker_pids() if "workers.draft" in Path(f"/proc/{p}/cmdline").read_text()]
            replies = [complete(server, prompt) for prompt in PROMPTS]
            assert [r.choices[0].text for r in replies] == local_outputs
            assert all(r.model_extra["speculation"]["num_draft_tokens"] > 0 for r in replies), log.read_text()
            assert sum(r.model_extra["speculation"]["num_accepted_tokens"] for r in replies) > 0
    finally:
        stop(worker)
    text = log.read_text()
    assert "made a new CURVE key pair" in text and "refused a ZeroMQ peer" not in text


def test_killed_remote_draft_falls_back_then_is_picked_up(remote_config, netns, tmp_path, local_outputs):
    """Catches: a server that waits on a dead remote draft (no heartbeat
    supervision: requests stall or fail), target-only output that differs, and a
    returning worker (a new process, same address) that is never used again."""
    log = tmp_path / "run.log"
    worker = start_worker(netns, remote_config, log)
    try:
        with external_draft_server(remote_config, log) as server:
            wait_healthy(server, timeout_s=180)
            assert drafted(server)[1] > 0
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            assert wait_until(lambda: "external draft worker silent" in log.read_text(), timeout_s=20), log.read_text()
            text, num_drafts = drafted(server)
            assert (text, num_drafts) == (local_outputs[0], 0)  # target-only, lossless, no stall
            assert server.metric("tandem:worker_restarts_total", role="draft") == 0

            worker = start_worker(netns, remote_config, log)
            assert wait_until(lambda: server.metric("tandem:worker_restarts_total", role="draft") == 1, timeout_s=120)
            text, num_drafts = drafted(server)
            assert text == local_outputs[0] and num_drafts > 0
    finally:
        stop(worker)


def test_peer_with_wrong_curve_key_gets_nothing(remote_config, netns, tmp_path, local_outputs):
    """Catches: ZeroMQ links without authentication. A peer in the namespace with
    a key pair of its own binds the draft's address after the real draft is gone
    and announces itself as a draft: the server must refuse and log it (by its
    address and key), never take it for the draft, and send it nothing, while
    requests go on target-only with the target's output."""
    log = tmp_path / "run.log"
    worker = start_worker(netns, remote_config, log)
    try:
        with external_draft_server(remote_config, log) as server:
            wait_healthy(server, timeout_s=180)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            assert wait_until(lambda: "external draft worker silent" in log.read_text(), timeout_s=20)
            config = yaml.safe_load(remote_config.read_text())
            public_key = Path(config["curve"]["key_file"]).with_suffix(".key")
            impostor = subprocess.Popen(
                netns.command(
                    sys.executable, "-m", "tests.impostor", "--bind", config["addresses"]["bind"]["draft"],
                    "--server", config["addresses"]["server"], "--server-key", str(public_key), "--seconds", "8",
                ),
                cwd=REPO, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                texts = [drafted(server, prompt) for prompt in PROMPTS]  # the verifier would begin drafts now
                report = json.loads(impostor.communicate(timeout=60)[0])
            finally:
                stop(impostor)
            assert texts == [(text, 0) for text in local_outputs]
            assert report["received"] == 0
            assert server.metric("tandem:worker_restarts_total", role="draft") == 0
    finally:
        stop(worker)
    refusals = [line for line in log.read_text().splitlines() if "refused a ZeroMQ peer" in line]
    assert any(netns.ns_ip in line and report["public"] in line for line in refusals), refusals


def test_remote_verify_worker_supervised_by_heartbeats(tmp_path, tiny_target_dir, netns, local_outputs):
    """Catches: `--external verify` starting a verify worker of its own or not
    waiting for the remote one; a dead remote verify worker left looking healthy
    (no heartbeat supervision: requests would hang); and a new one never picked up.
    The local draft reaches the remote verify worker across the veth pair."""
    config = config_with_external(tmp_path / "remote-verify.yaml", tiny_target_dir, netns, "verify")
    log = tmp_path / "run.log"
    worker = start_worker(netns, config, log, role="verify")
    try:
        with external_draft_server(config, log, external="verify") as server:
            wait_healthy(server, timeout_s=180)
            roles = {p: Path(f"/proc/{p}/cmdline").read_text() for p in server.worker_pids()}
            assert [c for c in roles.values() if "workers.draft" in c] and not [c for c in roles.values() if "workers.verify" in c]
            text, num_drafts = drafted(server)
            assert text == local_outputs[0] and num_drafts > 0
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            assert wait_until(lambda: health(server) == 503, timeout_s=20), log.read_text()
            worker = start_worker(netns, config, log, role="verify")
            assert wait_until(lambda: health(server) == 200, timeout_s=120), log.read_text()
            assert drafted(server)[0] == text
            assert server.metric("tandem:worker_restarts_total", role="verify") == 1
    finally:
        stop(worker)


def health(server) -> int:
    try:
        return httpx.get(f"{server.url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return -1
