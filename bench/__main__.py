"""``python -m bench``: every mode through the real server, side by side.

    python -m bench --modes ar,sd --prompts bench/prompts.jsonl --max-tokens 128 \\
        [--config configs/default.yaml] [--dtype float32] [--port 8090] [--temperature 0] \\
        [--limit N] [--out bench/results] [--variant 'LABEL=MODE key=value ...']

A variant runs a mode again with config settings (the knobs: run-ahead limit,
verification cap, placement), e.g. --variant 'amusd-ra16=amusd speculation.max_run_ahead=16'.

Peers, measured in the same run through the same client (rows marked `peer`):

    --peer llamacpp [--peer-draft-n 3,6] [--peer-target T.gguf] [--peer-draft D.gguf] [--peer-threads 2[,1]]
        llama-server (built by `make llamacpp`) on the config's target GGUF, then with
        its draft (-md, --spec-type draft-simple, --spec-draft-n-max N) for each N
    --external 'LABEL=http://HOST:PORT'   any OpenAI-compatible server already running (repeatable)

--modes '' runs the peers alone.

Writes ``bench-<timestamp>.{md,json}`` and ``latest.{md,json}`` into --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench import llamacpp
from bench.harness import DEFAULT_PROMPTS, REPO_ROOT, BenchError, Run, Settings, load_prompts, run_mode
from bench.peers import Peer, parse_external, peer_models, run_peer
from bench.report import (
    BASELINE,
    ModeResult,
    pooled,
    round_rows,
    rounds_markdown,
    summarize,
    to_json,
    to_markdown,
    write_report,
)
from configs.choices import DTYPES
from configs.modes import MODE_NAMES as MODES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Benchmark Tandem's modes through the real server.")
    p.add_argument("--modes", default="ar,sd", help="comma-separated, run in this order (default: %(default)s)")
    p.add_argument(
        "--variant", action="append", default=[], metavar="'LABEL=MODE KEY=VALUE ...'",
        help="also run MODE with config settings, reported as LABEL (repeatable), e.g. "
             "--variant 'amusd-ra16=amusd speculation.max_run_ahead=16'",
    )
    p.add_argument("--peer", choices=("llamacpp",), help="also measure llama.cpp's llama-server (make llamacpp)")
    p.add_argument("--peer-draft-n", default=",".join(map(str, llamacpp.DRAFT_N)),
                   help="llama.cpp+draft rows, one per --spec-draft-n-max value; '' for none (default: %(default)s)")
    p.add_argument("--peer-target", help="target GGUF for the peer (default: the config's target.path)")
    p.add_argument("--peer-draft", help="draft GGUF for the peer (default: the config's draft.path)")
    p.add_argument("--peer-threads", default=str(llamacpp.SERVER_THREADS),
                   help="llama-server -t; several (e.g. 2,1) give each row once per count, labelled t=N "
                        "(default: %(default)s)")
    p.add_argument("--peer-ctx", type=int, default=llamacpp.SERVER_CTX, help="llama-server -c (default: %(default)s)")
    p.add_argument(
        "--external", action="append", default=[], metavar="LABEL=URL",
        help="also measure an OpenAI-compatible server already running at URL, reported as LABEL (repeatable)",
    )
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL prompts file (default: the shipped one)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every mode, variant and peer this many times, in turn; the report pools "
                        "them and adds each round's ratio to ar (a drifting machine's speed then "
                        "falls on every row of a round alike)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--config", help="server YAML config (default: the server's default)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of both models")
    p.add_argument("--num-draft-tokens", type=int, help="draft tokens per round (server default if unset)")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="per-request seed (for temperature > 0)")
    p.add_argument("--no-logprobs", action="store_true", help="do not request top-2 logprobs (no divergence margins)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    return p


def llamacpp_peers(args: argparse.Namespace) -> list[Peer]:
    """The llama.cpp rows: the target alone, then with its draft for each --peer-draft-n."""
    binary = llamacpp.require_built() / "llama-server"
    target, draft = peer_models(args.config, args.peer_target, args.peer_draft)
    draft_ns = [int(n) for n in args.peer_draft_n.split(",") if n.strip()] if draft is not None else []
    thread_counts = [int(t) for t in args.peer_threads.split(",") if t.strip()]
    peers = []
    for threads in thread_counts:
        suffix = threads if len(thread_counts) > 1 else None
        common = dict(port=args.port, threads=threads, ctx=args.peer_ctx)
        peers.append(Peer(llamacpp.row_label(None, suffix), tuple(llamacpp.server_command(binary, target, **common))))
        for n in draft_ns:
            cmd = llamacpp.server_command(binary, target, draft=draft, draft_n=n, **common)
            peers.append(Peer(llamacpp.row_label(n, suffix), tuple(cmd)))
    return peers


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1:
        sys.exit(f"bench: --rounds must be at least 1, got {args.rounds}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"bench: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    try:
        runs = [Run(m, m) for m in modes] + [Run.parse_variant(v, MODES) for v in args.variant]
        peers = [parse_external(e) for e in args.external]
        if args.peer == "llamacpp":
            peers = llamacpp_peers(args) + peers
    except (BenchError, llamacpp.LlamaCppError, ValueError) as exc:
        sys.exit(f"bench: {exc}")
    if not runs and not peers:
        sys.exit(f"bench: nothing to run: give --modes (from {', '.join(MODES)}), --peer or --external")
    labels = [r.label for r in runs] + [p.label for p in peers]
    if len(set(labels)) != len(labels):
        sys.exit("bench: every mode, variant and peer needs its own label")
    if args.temperature > 0 and BASELINE in modes and args.seed is None:
        print("bench: note: temperature > 0 without --seed; outputs are not expected to match ar's")

    try:
        prompts = load_prompts(args.prompts, args.limit)
    except (OSError, BenchError) as exc:
        sys.exit(f"bench: {exc}")
    config = str(Path(args.config).resolve()) if args.config else None
    settings = Settings(
        config=config,
        dtype=args.dtype,
        port=args.port,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        num_draft_tokens=args.num_draft_tokens,
        logprobs=not args.no_logprobs,
        startup_timeout_s=args.startup_timeout,
        request_timeout_s=args.request_timeout,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _git_commit(),
        "config": args.config or "(server default)",
        "dtype": args.dtype or "(config)",
        "num_draft_tokens": args.num_draft_tokens if args.num_draft_tokens is not None else "(config)",
        "prompts": f"{Path(args.prompts).name} ({len(prompts)})",
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "host": f"{platform.machine()}, {os.cpu_count()} cpus",
        "load avg at start": _loadavg(),
    }
    if args.variant:
        meta["variants"] = "; ".join(f"{r.label} = {r.mode} {' '.join(r.settings)}" for r in runs if r.settings)
    for peer in peers:
        meta[f"peer {peer.label}"] = peer.url or " ".join(peer.command)
    print(f"bench: {len(prompts)} prompts, runs {', '.join(labels)}, max_tokens {args.max_tokens}")

    # Tandem's modes, then the peers: one server at a time on the same port and cores; all of
    # them again in each further round
    jobs = [lambda r=r: run_mode(r, prompts, settings, out / "logs") for r in runs]
    jobs += [lambda p=p: run_peer(p, prompts, settings, out / "logs") for p in peers]
    rounds: list[list[ModeResult]] = []
    failure = None
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"bench: round {number + 1} of {args.rounds}")
        results: list[ModeResult] = []
        for job in jobs:
            try:
                results.append(job())
            except BenchError as exc:
                failure = str(exc)
                print(f"bench: {exc}", file=sys.stderr)
                break
            except KeyboardInterrupt:
                failure = "interrupted"
                print("bench: interrupted", file=sys.stderr)
                break
        if failure is None or (results and not rounds):
            rounds.append(results)  # a round cut short is dropped, unless it is all there is
        if failure:
            break
    if not rounds or not rounds[0]:
        return 1

    meta["load avg at end"] = _loadavg()  # other work on the machine skews every timing: look here first
    if len(rounds) > 1:
        meta["rounds"] = len(rounds)
    results = pooled(rounds)
    summaries = summarize(results)
    if failure:
        meta["incomplete"] = failure.splitlines()[0]
    markdown = to_markdown(summaries, meta)
    data = to_json(summaries, results, meta)
    if len(rounds) > 1:
        rows = round_rows(rounds)
        markdown += "\n" + rounds_markdown(rows)
        data["rounds"] = [{"mode": r.mode, "tokens_per_s": r.tokens_per_s, "ratios_to_ar": r.ratios_to_ar,
                           "median_ratio_to_ar": r.median_ratio} for r in rows]
    write_report(out, f"bench-{stamp}", "latest", markdown, data, "bench")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
