"""Peer rows end to end, without llama.cpp: Tandem's own tiny-model server plays the peer.

`python -m bench --modes ar --external LABEL=URL` runs ar on a server of its own
and the same prompts against the already-running one: same model, greedy, so
the peer row must match ar's outputs exactly, and the report must mark it a peer.
A peer the bench starts itself (as it starts llama-server) goes through
`run_peer` with a command: here `tandem serve` again.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from bench.harness import Settings, load_prompts
from bench.peers import Peer, run_peer
from tests.helpers import REPO, free_port, launch_server


def test_external_peer_row_through_the_bench_command_line(tiny_config, tmp_path):
    """Two rounds (--rounds 2): each row pools both, and the per-round table gives each round's
    ratio to ar. Catches a round dropped, or rounds not reaching the report."""
    out = tmp_path / "results"
    with launch_server(tiny_config, mode="ar") as peer:
        command = [
            sys.executable, "-m", "bench", "--config", str(tiny_config), "--modes", "ar",
            "--external", f"tiny-peer={peer.url}", "--limit", "2", "--max-tokens", "8",
            "--port", str(free_port()), "--out", str(out), "--startup-timeout", "180", "--rounds", "2",
        ]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "latest.json").read_text())
    ar, row = data["summary"]
    assert (ar["mode"], ar["peer"], row["mode"], row["peer"]) == ("ar", False, "tiny-peer", True)
    assert row["num_requests"] == 4 and row["generated_tokens"] > 0  # 2 prompts, 2 rounds
    assert (row["identical_to_ar"], row["compared_to_ar"]) == (4, 4)  # same prompts, same greedy settings
    assert data["best_peer"] == "tiny-peer" and row["ratio_to_best_peer"] == 1.0
    assert row["verify_busy"] is None and row["startup_s"] is None  # no worker counters, nothing started
    assert data["meta"]["peer tiny-peer"] == f"{peer.url}/v1"
    markdown = (out / "latest.md").read_text()
    assert "| tiny-peer | peer | 4 |" in markdown and "| ar | tandem | 4 |" in markdown
    assert data["meta"]["rounds"] == 2 and "## Rounds" in markdown
    assert [r["mode"] for r in data["rounds"]] == ["ar", "tiny-peer"]
    assert data["rounds"][0]["ratios_to_ar"] == [1.0, 1.0] and all(t > 0 for t in data["rounds"][1]["tokens_per_s"])


def test_started_peer_row_runs_and_stops_its_server(tiny_config, tmp_path):
    port = free_port()
    settings = Settings(
        config=None, dtype=None, port=port, max_tokens=6, temperature=0.0, top_p=None, seed=None,
        num_draft_tokens=None, logprobs=True, startup_timeout_s=180, request_timeout_s=120,
    )
    command = (sys.executable, "-m", "server.cli", "serve", "--config", str(tiny_config), "--mode", "ar",
               "--host", "127.0.0.1", "--port", str(port))
    prompts = load_prompts(REPO / "bench" / "prompts.jsonl", limit=2)
    result = run_peer(Peer("started-peer", command=command), prompts, settings, tmp_path, say=lambda _: None)
    assert result.peer and result.mode == "started-peer" and result.startup_s is not None
    assert [r.prompt_id for r in result.requests] == [p.id for p in prompts]
    assert all(0 < r.completion_tokens <= 6 and r.tokens is not None for r in result.requests)
    assert list(tmp_path.glob("peer-started-peer-*.log"))  # its output went to a log of its own
    with socket.socket() as sock:  # the server was stopped: nothing answers on its port
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_load_table_runs_a_mode_and_an_external_peer_at_each_client_count(tiny_config, tmp_path):
    # catches a load table that drops a level or a peer, counts failed requests as served, or scrapes
    # the wrong worker's batch sizes (one client at a time: every target pass holds exactly one request)
    out = tmp_path / "results"
    with launch_server(tiny_config, mode="ar") as peer:
        command = [
            sys.executable, "-m", "bench.load_table", "--config", str(tiny_config), "--modes", "ar",
            "--clients", "1,2", "--requests-per-client", "1", "--min-requests", "2", "--max-tokens", "4",
            "--external", f"tiny-peer={peer.url}", "--port", str(free_port()), "--out", str(out),
            "--startup-timeout", "180", "--timeout", "120",
        ]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "load-latest.json").read_text())
    rows = [(r["label"], r["peer"], r["clients"], r["summary"]["succeeded"]) for r in data["rows"]]
    assert rows == [("ar", False, 1, 2), ("ar", False, 2, 2), ("tiny-peer", True, 1, 2), ("tiny-peer", True, 2, 2)]
    solo = data["rows"][0]
    assert solo["batch_mean"] == 1.0 and solo["summary"]["output_tokens"] > 0
    assert all(r["batch_mean"] is None for r in data["rows"] if r["peer"])
    assert "| tiny-peer | peer | 2 |" in (out / "load-latest.md").read_text()
