"""What a tensor-parallel target costs per pass on this machine, against the single process.

    python -m bench.tp_cost --config configs/default.yaml [--ranks 2] [--tokens 1,5] \\
        [--channels shm,gloo] [--single-threads 1,2] [--context 200] [--rounds 5] [--reps 8]

The config's target (its dtype and quantization) is timed as the verify engine runs it:
a pass of T new tokens over a `context`-token KV cache (T=1 a decode step, T=k+1 a
verification of k drafts), cropped back after each pass. Rows:
- single process, 1 thread on core 0, and R threads on cores 0..R-1 (the same cores TP uses);
- TP-R over each channel: rank r in its own process on core r, 1 thread each (rank 0 is
  this process). Channel `gloo-veth`: gloo with ranks 1..R-1 started alone (`tandem worker
  --role verify-rank`) in a network namespace, across a veth pair from rank 0 (a tcp://
  rendezvous; needs root: bench/netns.py), i.e. the TCP path of ranks on other hosts.
For TP rows also the all-reduces per pass (2 per layer, more when the shared-memory
channel cuts a long pass in chunks), their bytes per token (2 x layers x hidden x dtype
bytes: the wire cost per token of any TP-R ring, whatever R), and the share of rank 0's
pass spent inside them (waiting for the slowest rank included). Rank 0's thread CPU
time per pass is printed too: on a machine shared with other jobs it is the part of the
wall time that is this rank's own work. Prints Markdown; writes
bench/results/tp_cost.json. First, as a check, TP-R's logits of one pass against the
single process's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import os
import statistics
import time
from pathlib import Path

import torch

from bench.runtime_cost import OurRunner
from configs.loader import RendezvousConfig, load_config
from workers.model import load_model, resolve_checkpoint
from workers.model.dtypes import compute_dtype
from workers.ranks import RankPlacement
from workers.shell import apply_placement
from workers.tensor_parallel import TargetCheckpoint, TensorParallelModel

RESULTS = Path(__file__).resolve().parent / "results" / "tp_cost.json"


def time_passes(runner: OurRunner, T: int, vocab: int, rounds: int, reps: int, gen) -> tuple[list[float], list[float]]:
    """(wall seconds, this thread's CPU seconds) per pass of T random tokens, rounds x reps
    times (after one warm-up pass)."""
    runner.step(torch.randint(0, vocab, (T,), generator=gen))
    wall, cpu = [], []
    for _ in range(rounds * reps):
        tokens = torch.randint(0, vocab, (T,), generator=gen)
        t0, c0 = time.perf_counter(), time.thread_time()
        runner.step(tokens)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def allreduce_bytes_per_token(args, dtype: torch.dtype) -> int:
    """2 all-reduces per layer of a [1, hidden] row in the model dtype."""
    return 2 * args.n_layers * args.dim * (torch.finfo(dtype).bits // 8)


@contextlib.contextmanager
def tensor_parallel(channel: str, checkpoint: TargetCheckpoint, placements, capacity: int, config: str):
    """TP over `channel`; `gloo-veth`: ranks 1.. alone in a network namespace (see the docstring)."""
    if channel != "gloo-veth":
        with TensorParallelModel(checkpoint, placements, torch.device("cpu"), channel=channel, max_pass_tokens=capacity) as tp:
            yield tp
        return
    from bench.netns import network_namespace

    with network_namespace() as ns:
        with socket.socket() as probe:
            probe.bind((ns.host_ip, 0))
            port = probe.getsockname()[1]
        ranks = tuple(range(1, len(placements)))
        rendezvous = RendezvousConfig(address=f"tcp://{ns.host_ip}:{port}", external_ranks=ranks)
        devices = ", ".join(f"{{device: cpu, cores: [{r}], threads: 1}}" for r in range(len(placements)))
        settings = [f"placement.ar.target=[{devices}]", "tensor_parallel.channel=gloo",
                    f"tensor_parallel.rendezvous={{address: '{rendezvous.address}', external_ranks: {list(ranks)}}}"]
        procs = [subprocess.Popen(ns.command(sys.executable, "-m", "server.cli", "worker", "--role", "verify-rank",
                                             "--rank", str(r), "--config", config, "--mode", "ar",
                                             *[x for setting in settings for x in ("--set", setting)]))
                 for r in ranks]  # fmt: skip
        try:
            with TensorParallelModel(checkpoint, placements, torch.device("cpu"), channel="gloo",
                                     max_pass_tokens=capacity, rendezvous=rendezvous) as tp:  # fmt: skip
                yield tp
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", default="1,5", help="new tokens per pass")
    ap.add_argument("--channels", default="shm,gloo")
    ap.add_argument("--single-threads", default="", help="thread counts of the single-process rows (default: 1,R)")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--json", type=Path, default=RESULTS)
    a = ap.parse_args()
    R = a.ranks
    token_counts = [int(t) for t in a.tokens.split(",")]
    config = load_config(a.config)
    section = config.target
    dtype = compute_dtype(section.dtype, "cpu", section.quantization)
    path = resolve_checkpoint(section.path)
    gen = torch.Generator().manual_seed(0)
    load_start = os.getloadavg()
    rows = []
    checks: dict[str, dict] = {}

    def record(label: str, runner: OurRunner, vocab: int, tp: TensorParallelModel | None = None):
        for T in token_counts:
            if tp is not None:
                tp.stats.reset()
            t0 = time.perf_counter()
            ts, cpu = time_passes(runner, T, vocab, a.rounds, a.reps, gen)
            wall = time.perf_counter() - t0
            row = dict(setup=label, tokens_per_pass=T, ms_per_pass=round(statistics.median(ts) * 1e3, 2),
                       min_ms=round(min(ts) * 1e3, 2), rank0_cpu_ms=round(statistics.median(cpu) * 1e3, 2))
            if tp is not None:
                snap = tp.stats.snapshot().get("all_reduce", {"count": 0, "seconds": 0.0, "bytes": 0})
                passes = len(ts) + 1
                row.update(all_reduces_per_pass=round(snap["count"] / passes, 1),
                           allreduce_share=round(snap["seconds"] / wall, 3),
                           allreduce_kb_per_token=round(snap["bytes"] / passes / T / 1e3, 1))
            rows.append(row)
            print(row, flush=True)

    with torch.inference_mode():
        model = load_model(path, dtype, section.quantization)
        vocab = model.args.vocab_size
        context = torch.randint(0, vocab, (a.context,), generator=gen)
        capacity = a.context + max(token_counts) + 1
        runner = OurRunner(model, context, capacity)
        probe = context[-8:]
        reference = model.forward(probe, model.new_cache(16), num_logits=8)  # to check TP's logits against
        for threads in [int(n) for n in a.single_threads.split(",")] if a.single_threads else (1, R):
            apply_placement(RankPlacement(cores=tuple(range(threads)), threads=threads))
            record(f"single process, {threads} thread(s)", runner, vocab)
        args = model.args
        del runner, model
        placements = [RankPlacement(cores=(r,), threads=1) for r in range(R)]
        apply_placement(placements[0])
        checkpoint = TargetCheckpoint(str(path), section.dtype, section.quantization)
        for channel in a.channels.split(","):
            with tensor_parallel(channel, checkpoint, placements, capacity, a.config) as tp:
                logits = tp.forward(probe, tp.new_cache(16), num_logits=8)
                checks[channel] = dict(
                    max_diff_over_range=round(((logits - reference).abs().max() / reference.abs().max()).item(), 5),
                    argmax_equal=int((logits.argmax(-1) == reference.argmax(-1)).sum()), rows=len(probe))
                record(f"TP-{R}, {channel}", OurRunner(tp, context, capacity), vocab, tp)

    per_token = allreduce_bytes_per_token(args, dtype)
    load_end = os.getloadavg()
    base = {r["tokens_per_pass"]: r["ms_per_pass"] for r in rows if r["setup"] == "single process, 1 thread(s)"}
    print(f"\n{a.config}: target {section.path} ({section.dtype}, {section.quantization}), {args.n_layers} layers, "
          f"hidden {args.dim}; context {a.context}; medians of {a.rounds}x{a.reps} passes; "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}\n")
    print(f"All-reduce bytes per token: 2 x {args.n_layers} layers x {args.dim} x {torch.finfo(dtype).bits // 8} bytes "
          f"= {per_token / 1e3:.1f} KB ({2 * args.n_layers} all-reduces per pass)\n")
    for channel, check in checks.items():
        print(f"TP-{R} ({channel}) logits of an 8-token pass vs the single process: max |diff| = "
              f"{check['max_diff_over_range']:.5f} of the logits' range, argmax equal in "
              f"{check['argmax_equal']}/{check['rows']} rows")
    print()
    print("| setup | tokens/pass | ms/pass | min | x single 1 thread | rank 0 CPU ms | all-reduces/pass | in all-reduce |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = f"{100 * r['allreduce_share']:.0f}%" if "allreduce_share" in r else ""
        print(f"| {r['setup']} | {r['tokens_per_pass']} | {r['ms_per_pass']:.1f} | {r['min_ms']:.1f} | "
              f"{r['ms_per_pass'] / base[r['tokens_per_pass']]:.2f} | {r['rank0_cpu_ms']:.1f} | "
              f"{r.get('all_reduces_per_pass', '')} | {share} |")
    print("\n(rank 0 CPU ms: the CPU time of rank 0's own thread per pass: its compute, plus the spinning of a "
          "shared-memory wait; a gloo wait sleeps. With other jobs on the cores, the wall times mostly measure "
          "the wait for the other rank to be scheduled.)")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(dict(config=a.config, context=a.context, ranks=R, allreduce_bytes_per_token=per_token,
                                      load_average=[load_start, load_end], rows=rows, logits_check=checks), indent=2))
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
