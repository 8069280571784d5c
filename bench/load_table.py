"""``python -m bench.load_table``: concurrent load at several client counts, for
every mode and peer, side by side in one run.

    python -m bench.load_table --config configs/default.yaml --modes ar,sd,amusd --clients 1,4,16,32
    python -m bench.load_table --config configs/qwen2.5-coder.yaml --modes ar,sd,amusd --clients 1,4,8 \\
        --set scheduler.max_running_requests=8 --peer llamacpp --peer-slots 8

For each mode (and each --variant) a ``tandem serve`` is started, warmed up
with two requests, then loaded by ``bench.load``'s clients at each client count
in turn: --requests-per-client requests per client (at least --min-requests),
the same deterministic mix as ``python -m bench.load`` (half streamed, half
chat, half seeded sampling). A peer (``--peer llamacpp``: ``llama-server -np
SLOTS``, continuous batching on the config's GGUF files; or ``--external
LABEL=URL``) gets the same requests through the same client.

Reported per row and client count: output tokens/s and its ratio to the row's
own 1-client figure, TTFT and ITL p50/p99 from the streamed requests, the mean
number of requests in one target pass (Tandem rows: ``tandem:batch_size`` of the
verify worker, scraped before and after), and failures. Neither side reuses
prompt KV across requests (Tandem ``scheduler.prefix_caching=false``, llama-server
``--no-cache-prompt``), as in ``python -m bench``.

Writes ``load-<timestamp>.{md,json}`` and ``load-latest.{md,json}`` into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import httpx

from bench import llamacpp
from bench.harness import REPO_ROOT, BenchError, Run, ServerProcess, Settings, log_path
from bench.load import DEFAULT_PROMPTS, load_prompt_texts, plan_requests, run_load, summarize
from bench.peers import Peer, PeerProcess, parse_external, peer_models
from bench.report import write_report
from configs.modes import MODE_NAMES as MODES

STATS_WAIT_S = 1.2  # the workers report their counters about once a second


@dataclass(frozen=True)
class Level:
    """One load level: how many clients, how many requests in all."""

    clients: int
    requests: int


@dataclass(frozen=True)
class LoadRow:
    """One row of the table: a server at one load level."""

    label: str
    peer: bool
    clients: int
    summary: dict  # bench.load.summarize's
    batch_mean: float | None = None  # requests per target pass (Tandem rows)

    @property
    def tokens_per_s(self) -> float:
        return self.summary["output_tokens_per_s"] or 0.0


def levels(clients: list[int], requests_per_client: int, min_requests: int) -> list[Level]:
    return [Level(c, max(c * requests_per_client, min_requests)) for c in clients]


def batch_totals(text: str, role: str = "verify") -> tuple[float, float]:
    """(sum, count) of ``tandem:batch_size`` for a worker role in a /metrics page; (0, 0) if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "tandem:batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("role") != role:
                continue
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def _scrape_batches(url: str) -> tuple[float, float]:
    return batch_totals(httpx.get(f"{url}/metrics", timeout=10).text)


def measure_levels(label: str, url: str, prompts: list[str], plan_levels: list[Level], args: argparse.Namespace,
                   tandem: bool, say: Callable[[str], None] = print) -> list[LoadRow]:
    """Warm up, then each level in turn against the server at `url`."""
    asyncio.run(run_load(url, plan_requests(prompts, 2, max_tokens=8), clients=1, timeout_s=args.timeout))
    rows = []
    for level in plan_levels:
        plans = plan_requests(prompts, level.requests, max_tokens=args.max_tokens, mix_seed=args.mix_seed)
        if tandem:
            time.sleep(STATS_WAIT_S)
            before = _scrape_batches(url)
        results, elapsed = asyncio.run(run_load(url, plans, clients=level.clients, timeout_s=args.timeout))
        batch_mean = None
        if tandem:
            time.sleep(STATS_WAIT_S)
            after = _scrape_batches(url)
            passes = after[1] - before[1]
            batch_mean = (after[0] - before[0]) / passes if passes > 0 else None
        row = LoadRow(label, not tandem, level.clients, summarize(results, elapsed, level.clients), batch_mean)
        say(f"[{label}] {level.clients:3d} clients: {row.tokens_per_s:7.1f} tokens/s, "
            f"{row.summary['failed']} failed, {elapsed:.1f} s")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the report


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def to_markdown(rows: list[LoadRow], meta: dict) -> str:
    solo = {r.label: r.tokens_per_s for r in rows if r.clients == 1}
    best_peer: dict[int, float] = {}
    for r in rows:
        if r.peer:
            best_peer[r.clients] = max(best_peer.get(r.clients, 0.0), r.tokens_per_s)
    lines = ["# Tandem load table", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "| row | kind | clients | tokens/s | x 1 client | x best peer | TTFT p50 / p99 ms "
              "| ITL p50 / p99 ms | requests per target pass | failed |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r.summary
        own = f"{r.tokens_per_s / solo[r.label]:.2f}x" if solo.get(r.label) else "-"
        peer = f"{r.tokens_per_s / best_peer[r.clients]:.2f}x" if best_peer.get(r.clients) else "-"
        batch = "-" if r.batch_mean is None else f"{r.batch_mean:.2f}"
        lines.append(
            f"| {r.label} | {'peer' if r.peer else 'tandem'} | {r.clients} | {r.tokens_per_s:.1f} | {own} | {peer} "
            f"| {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p99'])} | {_ms(s['itl_s']['p50'])} / "
            f"{_ms(s['itl_s']['p99'])} | {batch} | {s['failed']} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="server YAML config (default: the server's default)")
    p.add_argument("--modes", default="ar,sd,amusd", help="Tandem modes, in this order ('' for none)")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL=MODE key=value ...'",
                   help="a mode again with config settings (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="settings", metavar="KEY=VALUE",
                   help="a config setting for every Tandem row (repeatable)")
    p.add_argument("--clients", type=_ints, default=[1, 4, 16, 32], help="client counts (default: 1,4,16,32)")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--mix-seed", type=int, default=0)
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--peer", choices=("llamacpp",), help="also llama-server -np SLOTS on the config's target GGUF")
    p.add_argument("--peer-slots", type=_ints, help="llama-server -np values, one row each (default: the most clients)")
    p.add_argument("--peer-threads", type=int, default=llamacpp.SERVER_THREADS)
    p.add_argument("--external", action="append", default=[], metavar="LABEL=URL",
                   help="an OpenAI-compatible server already running (repeatable)")
    p.add_argument("--port", type=int, default=8091)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--timeout", type=float, default=900.0, help="per-request client timeout, seconds")
    p.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    return p


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(config=str(Path(args.config).resolve()) if args.config else None, dtype=None, port=args.port,
                    max_tokens=args.max_tokens, temperature=0.0, top_p=None, seed=None, num_draft_tokens=None,
                    logprobs=False, startup_timeout_s=args.startup_timeout, request_timeout_s=args.timeout)


def _llamacpp_peers(args: argparse.Namespace) -> list[Peer]:
    binary = llamacpp.require_built() / "llama-server"
    target, _ = peer_models(args.config, None, None)
    peers = []
    for slots in args.peer_slots or [max(args.clients)]:
        cmd = llamacpp.server_command(binary, target, args.port, threads=args.peer_threads, slots=slots)
        peers.append(Peer(f"llama.cpp -np {slots}", tuple(cmd)))
    return peers


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in modes if m not in MODES]:
        sys.exit(f"bench.load_table: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.requests_per_client < 1 or args.min_requests < 1 or args.max_tokens < 1:
        sys.exit("bench.load_table: --requests-per-client, --min-requests and --max-tokens must be at least 1")
    try:
        common = tuple(args.settings)
        runs = [Run(m, m, common) for m in modes]
        for text in args.variant:
            variant = Run.parse_variant(text, MODES)
            runs.append(Run(variant.label, variant.mode, common + variant.settings))
        peers = (_llamacpp_peers(args) if args.peer == "llamacpp" else []) + [parse_external(e) for e in args.external]
        prompts = load_prompt_texts(args.prompts)
    except (BenchError, llamacpp.LlamaCppError, ValueError, OSError) as exc:
        sys.exit(f"bench.load_table: {exc}")
    if not runs and not peers:
        sys.exit("bench.load_table: nothing to run: give --modes, --variant, --peer or --external")
    plan_levels = levels(args.clients, args.requests_per_client, args.min_requests)
    settings = _settings(args)
    out = Path(args.out)
    logs = out / "logs"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": args.config or "(server default)",
            "levels": ", ".join(f"{lv.clients} clients x {lv.requests} requests" for lv in plan_levels),
            "max_tokens": args.max_tokens, "mix": "half streamed, half chat, half seeded sampling (bench.load)"}
    if common:
        meta["settings"] = " ".join(common)
    for peer in peers:
        meta[f"peer {peer.label}"] = peer.url or " ".join(peer.command)

    rows: list[LoadRow] = []
    url = f"http://127.0.0.1:{args.port}"
    failure = None
    try:
        for run in runs:
            with ServerProcess(run, settings, log_path(logs, "load", run.label)) as server:
                rows += measure_levels(run.label, url, prompts, plan_levels, args, tandem=True)
                if not server.alive():
                    raise BenchError(f"[{run.label}] the server died during the load")
        for peer in peers:
            if peer.url is not None:
                rows += measure_levels(peer.label, peer.url, prompts, plan_levels, args, tandem=False)
                continue
            with PeerProcess(peer, settings, log_path(logs, "load-peer", peer.label)):
                rows += measure_levels(peer.label, url, prompts, plan_levels, args, tandem=False)
    except (BenchError, httpx.HTTPError) as exc:
        failure = str(exc)
        print(f"bench.load_table: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        failure = "interrupted"
    if failure:
        meta["incomplete"] = failure.splitlines()[0]
    if not rows:
        return 1
    write_report(out, f"load-{time.strftime('%Y%m%d-%H%M%S')}", "load-latest", to_markdown(rows, meta),
                 {"meta": meta, "rows": [asdict(r) for r in rows]}, "bench.load_table")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
