"""What a speculative round costs on the wire: bytes per round and the one-way
latency of each message over ipc://, loopback tcp:// and tcp:// across a veth
pair (a draft worker in another network namespace), with and without CURVE.

    python -m bench.transport [--k 4] [--iterations 1000] [--json FILE]

The messages are the real ones (protocol.messages, protocol.codec) of one `sd`
round in steady state: the verifier publishes the verified prefix
(VerifiedPrefix, accepted + 1 new tokens), the draft sends its k drafts one
message each (DraftTokens: tokens only, sampling or not, since sampling became a
race; workers/sampling/randomness.py), the verifier sends the round's tokens to
the server (TokenOutput). Latency: a
ping-pong between two processes over Tandem's own socket pattern (each binds a
PULL inbox, PUSHes to the other's), half the round trip; the peer echoes the
frames untouched. The veth rows need root and `ip` (bench.netns); without them
they are left out, and the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from protocol.codec import encode
from protocol.curve import load_keys, write_key_pair
from protocol.messages import DraftTokens, TokenOutput, VerifiedPrefix
from protocol.sockets import Inbox, Outbox

REQUEST_ID = "cmpl-5f0c1e6b2a9d4c8e9b7a6d5c4b3a2918"  # the server's id format
STOP = b"stop"


def round_messages(k: int, accepted: int) -> dict[str, tuple]:
    """name -> (link, message) of one sd round: k drafts, `accepted` of them accepted."""
    tokens = list(range(1000, 1000 + accepted + 1))
    return {
        "VerifiedPrefix": ("verify -> draft", VerifiedPrefix(REQUEST_ID, 18, 300, tokens, k)),
        "DraftTokens": ("draft -> verify", DraftTokens(REQUEST_ID, 18, 301, [4242])),
        "TokenOutput": (
            "verify -> server",
            TokenOutput(REQUEST_ID, tokens, num_draft_tokens=k, num_accepted_tokens=accepted, run_ahead=k),
        ),
    }


def frame_bytes(message) -> int:
    return sum(memoryview(frame).nbytes for frame in encode(message))


def round_bytes(k: int, accepted: int) -> dict[str, int]:
    """Bytes of one round, by link (the k DraftTokens counted k times)."""
    out: dict[str, int] = {}
    for name, (link, message) in round_messages(k, accepted).items():
        out[link] = out.get(link, 0) + frame_bytes(message) * (k if name == "DraftTokens" else 1)
    return out


# -- the echo peer -----------------------------------------------------------------


def echo(inbox_address: str, reply_address: str, key_file: str) -> None:
    """Bind `inbox_address`, push every message back to `reply_address` until STOP."""
    keys = load_keys(key_file) if key_file else None
    inbox, outbox = Inbox(inbox_address, curve=keys), Outbox(reply_address, curve=keys)
    while True:
        frames = inbox.socket.recv_multipart(copy=False)
        if frames[0].bytes == STOP:
            break
        outbox.socket.send_multipart(frames, copy=False)
    outbox.socket.send(STOP)
    inbox.close(), outbox.close()


# -- measuring ---------------------------------------------------------------------


@dataclass
class Link:
    name: str
    ours: str  # the address we bind
    peers: str  # the address we push to (the peer binds `peer_bind`)
    peer_bind: str
    reply: str  # where the peer pushes to (our address as it sees it)
    command_prefix: tuple[str, ...] = ()  # e.g. `ip netns exec NAME`


def one_way_us(link: Link, payloads: dict[str, list], iterations: int, key_file: str) -> dict[str, dict[str, float]]:
    """p50/p90 one-way latency (µs) per payload over `link`."""
    keys = load_keys(key_file) if key_file else None
    inbox = Inbox(link.ours, curve=keys)
    peer = subprocess.Popen(
        [*link.command_prefix, sys.executable, "-m", "bench.transport", "echo",
         "--inbox", link.peer_bind, "--reply", link.reply, "--key-file", key_file],
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    outbox = Outbox(link.peers, curve=keys)
    results = {}
    try:
        # the peer is up when a message comes back
        while True:
            outbox.socket.send_multipart([b"warm", b""])
            if inbox.socket.poll(200):
                inbox.socket.recv_multipart()
                break
            if peer.poll() is not None:
                raise RuntimeError(f"the echo peer on {link.name} exited with {peer.returncode}")
        while inbox.socket.poll(200):  # the extra warm-ups
            inbox.socket.recv_multipart()
        for name, frames in payloads.items():
            count = iterations if sum(memoryview(f).nbytes for f in frames) < 65536 else max(iterations // 5, 50)
            samples = []
            for i in range(count + 20):
                started = time.perf_counter()
                outbox.socket.send_multipart(frames, copy=False)
                inbox.socket.recv_multipart(copy=False)
                if i >= 20:
                    samples.append((time.perf_counter() - started) / 2)
            samples.sort()
            results[name] = {
                "p50_us": 1e6 * statistics.median(samples),
                "p90_us": 1e6 * samples[int(0.9 * (len(samples) - 1))],
                "n": len(samples),
            }
        outbox.socket.send(STOP)
        inbox.socket.poll(5000)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            peer.wait(10)
        if peer.poll() is None:
            peer.kill()
        inbox.close(), outbox.close()
    return results


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def links(scratch: Path, netns) -> list[Link]:
    scratch.mkdir(exist_ok=True)
    a, b = free_port(), free_port()
    out = [
        Link("ipc", f"ipc://{scratch}/a.sock", f"ipc://{scratch}/b.sock", f"ipc://{scratch}/b.sock",
             f"ipc://{scratch}/a.sock"),
        Link("tcp loopback", f"tcp://127.0.0.1:{a}", f"tcp://127.0.0.1:{b}", f"tcp://127.0.0.1:{b}",
             f"tcp://127.0.0.1:{a}"),
    ]  # fmt: skip
    if netns is not None:
        c, d = free_port(), free_port()
        out.append(
            Link("tcp veth (netns)", f"tcp://{netns.host_ip}:{c}", f"tcp://{netns.ns_ip}:{d}", f"tcp://0.0.0.0:{d}",
                 f"tcp://{netns.host_ip}:{c}", tuple(netns.command()))
        )  # fmt: skip
    return out


def measure(k: int, iterations: int) -> dict:
    from bench.netns import missing_requirement, network_namespace

    messages = round_messages(k, accepted=k - 1)
    payloads = {name: encode(messages[name][1]) for name in ("VerifiedPrefix", "DraftTokens")}
    report = {
        "k": k,
        "payload_bytes": {name: sum(memoryview(f).nbytes for f in frames) for name, frames in payloads.items()},
        "round_bytes": round_bytes(k, k - 1),
        "latency": {},
        "veth": missing_requirement() or "measured",
    }
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-transport-")))
        _, key_file = write_key_pair(scratch / "bench.key_secret")
        netns = None if missing_requirement() else stack.enter_context(network_namespace())
        for curve in (False, True):  # fresh ports and paths each time: a closed socket frees its port late
            for link in links(scratch / str(curve), netns):
                label = f"{link.name}{', CURVE' if curve else ''}"
                report["latency"][label] = one_way_us(link, payloads, iterations, str(key_file) if curve else "")
                print(f"measured {label}", file=sys.stderr, flush=True)
    return report


def markdown(report: dict) -> str:
    lines = [
        f"Bytes per message (k = {report['k']}): "
        + ", ".join(f"{name} {size:,} B" for name, size in report["payload_bytes"].items()),
        "",
        "| bytes per round | " + " | ".join(report["round_bytes"]) + " |",
        "| --- |" + " ---: |" * len(report["round_bytes"]),
        "| greedy or sampling | " + " | ".join(f"{v:,}" for v in report["round_bytes"].values()) + " |",
        "",
        "| one-way latency, µs (p50 / p90) | " + " | ".join(report["payload_bytes"]) + " |",
        "| --- |" + " ---: |" * len(report["payload_bytes"]),
    ]
    for label, rows in report["latency"].items():
        cells = [f"{rows[name]['p50_us']:.0f} / {rows[name]['p90_us']:.0f}" for name in report["payload_bytes"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if report["veth"] != "measured":
        lines.append(f"\n(no veth rows: {report['veth']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    peer = commands.add_parser("echo", help="(internal) the echo peer")
    peer.add_argument("--inbox", required=True)
    peer.add_argument("--reply", required=True)
    peer.add_argument("--key-file", default="")
    parser.add_argument("--k", type=int, default=4, help="drafts per round")
    parser.add_argument("--iterations", type=int, default=1000, help="ping-pongs per small message")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.command == "echo":
        return echo(args.inbox, args.reply, args.key_file)
    report = measure(args.k, args.iterations)
    print(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
