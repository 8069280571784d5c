"""EasySpec on the default draft: drafting-stage speed and acceptance, fuzzy vs sequential.

    python -m bench.easyspec [--tokens 256] [--prompts 3] [--k 4] [--out bench/results/easyspec.json]

The draft is the default one (SmolLM2-135M-Instruct, weight-only quantized as
configs/default.yaml says, int4 today; bf16 activations); the target is the same network in bf16. Everything runs on the
same two cores:

- sequential drafting: the plain draft, 1 thread on core 0, or 2 threads on
  cores 0+1 (the baseline is whichever is faster);
- fuzzy drafting: the LayerParallelDraftModel over 2 ranks (1 thread each, rank 0
  pinned to core 0, rank 1 to core 1), plan [0]..[3] [4,5]..[24,25] [26]..[29],
  variants `full` and `attention`, calibration every_round / on_mismatch / never.

Measured:
1. exchange latency: an all-reduce of [T, 576] bf16 between two processes on
   cores 0 and 1, shared memory vs gloo;
2. single-token pass times (interleaved bursts; median and p10, the machine
   being shared);
3. drafting stage: greedy speculative rounds of k drafts along the target's own
   greedy continuation of each prompt (`--tokens` tokens): the draft proposes k,
   the leading matches are accepted plus the target's token, the draft cache is
   cropped like DraftEngine does. Drafting time per drafted token (the first
   pass of a round, which carries the calibration, included) and the
   acceptance rate (accepted / drafted);
4. teacher-forced agreement: the same rounds but the draft is fed the target's
   tokens, so every position counts: the fraction where the draft's argmax is
   the target's token (calibration every_round vs never).

Timing: the rounds are deterministic, so every config runs `--repeats` times
(interleaved) and each round counts with its fastest repeat ("best of
repeats"): the machine is shared, and a round slowed by another process says
nothing about the method. Medians over all repeats are reported too.

Prints Markdown tables; writes JSON to bench/results/easyspec.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from configs.loader import load_config

EMBEDDED = "embedded:smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results" / "easyspec.json"
PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


def pin(cores: set[int], threads: int) -> None:
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- 1. exchange latency ---------------------------------------------------------


def _exchange_worker(rank, kind, path, ready, shapes, reps, conn):
    from workers.ranks.channel import DistChannel, DistRendezvous, ShmChannel, ShmLayout

    pin({rank}, 1)
    if kind == "shm":
        layout = ShmLayout(path, 2, 1 << 20, 64, 30.0, os.getppid())
        if rank == 1:
            ready.wait(30)
        channel = ShmChannel(layout, rank, [])
        if rank == 0:
            ready.set()
    else:
        channel = DistChannel(DistRendezvous(f"file://{path}", 2, "gloo", 30.0), rank, torch.device("cpu"))
    out = {}
    for T in shapes:
        x = torch.ones(T, 576, dtype=torch.bfloat16)
        for _ in range(50):
            channel.all_reduce_(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            channel.all_reduce_(x)
            times.append(time.perf_counter() - t0)
        out[T] = {"median_us": 1e6 * statistics.median(times), "p10_us": 1e6 * percentile(times, 0.1),
                  "p90_us": 1e6 * percentile(times, 0.9)}
    channel.barrier()
    channel.close()
    if rank == 0:
        conn.send(out)


def exchange_latency(shapes=(1, 4, 16), reps=2000) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for kind in ("shm", "gloo"):
        tmp = tempfile.mkdtemp(prefix="tandem-bench-")
        path = os.path.join("/dev/shm" if kind == "shm" else tmp, f"tandem-bench-{os.getpid()}-{kind}")
        ready = ctx.Event()
        parent, child = ctx.Pipe()
        procs = [ctx.Process(target=_exchange_worker, args=(r, kind, path, ready, shapes, reps if kind == "shm" else reps // 4, child))
                 for r in range(2)]
        for p in procs:
            p.start()
        results[kind] = parent.recv() if parent.poll(300) else None
        for p in procs:
            p.join(30)
        for f in (path,):
            try:
                os.unlink(f)
            except FileNotFoundError:
                pass
    return results


# -- models ----------------------------------------------------------------------


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    out = []
    for row in rows[:n]:
        if row.get("kind", "chat") == "chat":
            ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        out.append(list(ids))
    return out


@torch.inference_mode()
def greedy_continuation(target, ids: list[int], n: int) -> list[int]:
    cache = target.new_cache(len(ids) + n + 8)
    logits = target.forward(torch.tensor(ids), cache)
    out = []
    for _ in range(n):
        token = int(logits[-1].argmax())
        out.append(token)
        logits = target.forward(torch.tensor([token]), cache)
    return out


@dataclass
class RunResult:
    round_ms: list[float] = field(default_factory=list)  # drafting time of each round but the first
    round_tokens: list[int] = field(default_factory=list)  # drafts of each of those rounds
    drafted: int = 0
    accepted: int = 0
    agree: int = 0
    positions: int = 0
    rounds: int = 0


@torch.inference_mode()
def simulate(model, ids: list[int], cont: list[int], k: int, teacher_forced: bool) -> RunResult:
    """Greedy speculative rounds of k drafts along the target's continuation `cont`.

    The draft cache is handled as DraftEngine does: it holds the verified prefix
    plus the drafts but the last; on the verifier's answer it is rolled back to the
    common prefix and the new verified tokens are fed at the next round's start.
    teacher_forced: the draft is fed the target's tokens instead of its own drafts.
    """
    result = RunResult()
    cache = model.new_cache(len(ids) + len(cont) + k + 8)
    verified = list(ids)
    pos = 0
    first = True
    while pos < len(cont):
        truth = cont[pos : pos + k]
        kk = len(truth)
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(verified[cache.length :]), cache)
        prefill_s = time.perf_counter() - t0 if first else 0.0
        drafts = [int(logits[-1].argmax())]
        for j in range(1, kk):
            feed = truth[j - 1] if teacher_forced else drafts[-1]
            drafts.append(int(model.forward(torch.tensor([feed]), cache)[-1].argmax()))
        elapsed = time.perf_counter() - t0 - prefill_s
        if not first:  # the first round's first pass is the prompt's prefill, not drafting
            result.round_ms.append(1e3 * elapsed)
            result.round_tokens.append(kk)
        first = False
        matches = [d == t for d, t in zip(drafts, truth)]
        result.agree += sum(matches)
        result.positions += kk
        accepted = kk if all(matches) else matches.index(False)
        if teacher_forced:
            accepted = kk
        result.drafted += kk
        result.accepted += accepted
        result.rounds += 1
        common = len(verified) + accepted
        # teacher-forced: no bonus token, so that every position is predicted once
        step = kk if teacher_forced else min(accepted + 1, len(cont) - pos)
        verified += cont[pos : pos + step]
        pos += step
        model.after_rollback(cache, min(cache.length, common))
    return result


class Plain:
    """The plain draft with a thread setting applied around each call."""

    def __init__(self, model, cores: set[int], threads: int):
        self.model, self.cores, self.threads = model, cores, threads

    def activate(self):
        pin(self.cores, self.threads)

    def new_cache(self, n):
        return self.model.new_cache(n)

    def forward(self, tokens, cache, num_logits=1):
        return self.model.forward(tokens, cache, num_logits)

    def after_rollback(self, cache, keep):
        cache.crop(keep)


class Fuzzy:
    def __init__(self, draft, variant: str, calibration: str, split_head: bool = True):
        self.draft, self.variant, self.calibration, self.split_head = draft, variant, calibration, split_head

    def activate(self):
        pin({0}, 1)
        self.draft.configure(variant=self.variant, calibration=self.calibration, split_head=self.split_head)

    def new_cache(self, n):
        return self.draft.new_cache(n)

    def forward(self, tokens, cache, num_logits=1):
        return self.draft.forward(tokens, cache, num_logits)

    def after_rollback(self, cache, keep):
        self.draft.after_rollback(cache, keep)


# -- 2. pass times -----------------------------------------------------------------


@torch.inference_mode()
def pass_times(configs: dict, context: list[int], bursts: int, per_burst: int) -> dict:
    """Single-token pass after `context` tokens, interleaved bursts: median and p10 in ms."""
    caches = {}
    for name, (runner, kwargs) in configs.items():
        runner.activate()
        cache = runner.new_cache(len(context) + 8)
        runner.forward(torch.tensor(context), cache)
        caches[name] = cache
    times = {name: [] for name in configs}
    token = torch.tensor([context[-1]])
    for _ in range(bursts):
        for name, (runner, kwargs) in configs.items():
            runner.activate()
            cache = caches[name]
            for _ in range(per_burst):
                t0 = time.perf_counter()
                runner.draft.forward(token, cache, **kwargs) if kwargs else runner.forward(token, cache)
                times[name].append(1e3 * (time.perf_counter() - t0))
                runner.after_rollback(cache, len(context))
    return {name: {"median_ms": statistics.median(t), "p10_ms": percentile(t, 0.1)} for name, t in times.items()}


# -- main ----------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.easyspec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="target continuation length per prompt")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="drafts per round")
    parser.add_argument("--bursts", type=int, default=12, help="pass-time bursts per config")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the speculative rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from workers.easyspec import DraftCheckpoint, LayerParallelDraftModel, RankPlacement, make_layer_plan
    from workers.model import load_model, load_tokenizer, resolve_checkpoint
    from workers.model.dtypes import compute_dtype, dtype_name

    started = time.time()
    load_start = os.getloadavg()
    config = load_config()
    quantization = config.draft.quantization
    dtype = compute_dtype(config.draft.dtype, "cpu", quantization)
    report: dict = {"model": EMBEDDED, "draft_quantization": quantization, "tokens": args.tokens, "k": args.k, "torch": torch.__version__,
                    "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_start": load_start}

    print("exchange latency (all-reduce [T, 576] bf16, cores 0 and 1) ...", flush=True)
    report["exchange_latency"] = exchange_latency()

    path = resolve_checkpoint(EMBEDDED)
    tokenizer = load_tokenizer(path)
    pin({0, 1}, 2)
    target = load_model(path, dtype=dtype)
    draft = load_model(path, dtype=dtype, quantization=quantization)
    prompts = prompt_ids(tokenizer, args.prompts)
    print(f"target continuations ({args.prompts} prompts x {args.tokens} tokens) ...", flush=True)
    conts = [greedy_continuation(target, ids, args.tokens) for ids in prompts]
    del target

    plan = make_layer_plan(draft.args.n_layers, 2)
    report["plan"] = plan.describe()
    placements = [RankPlacement(cores=(0,), threads=1), RankPlacement(cores=(1,), threads=1)]
    pin({0}, 1)
    fuzzy = LayerParallelDraftModel.distributed(draft, DraftCheckpoint(str(path), dtype_name(dtype), quantization), plan, placements=placements)
    try:
        seq1, seq2 = Plain(draft, {0}, 1), Plain(draft, {0, 1}, 2)
        configs = {
            "sequential 1 thread": seq1,
            "sequential 2 threads": seq2,
            "fuzzy full, every_round": Fuzzy(fuzzy, "full", "every_round"),
            "fuzzy full, on_mismatch": Fuzzy(fuzzy, "full", "on_mismatch"),
            "fuzzy full, never": Fuzzy(fuzzy, "full", "never"),
            "fuzzy attention, every_round": Fuzzy(fuzzy, "attention", "every_round"),
            "fuzzy attention, never": Fuzzy(fuzzy, "attention", "never"),
            "fuzzy full, every_round, unsplit head": Fuzzy(fuzzy, "full", "every_round", split_head=False),
        }

        print("single-token pass times ...", flush=True)
        full, attn = Fuzzy(fuzzy, "full", "never"), Fuzzy(fuzzy, "attention", "never")
        full_unsplit = Fuzzy(fuzzy, "full", "never", split_head=False)
        context = prompts[0] + conts[0][:64]
        report["pass_ms"] = pass_times(
            {
                "sequential 1 thread": (seq1, None),
                "sequential 2 threads": (seq2, None),
                "fuzzy full (split head)": (full, {"exact": False}),
                "fuzzy full (unsplit head)": (full_unsplit, {"exact": False}),
                "fuzzy attention (split head)": (attn, {"exact": False}),
                "exact on both ranks (calibration, split head)": (full, {"exact": True}),
            },
            context,
            args.bursts,
            10,
        )

        print(f"speculative rounds ({args.repeats} interleaved repeats) ...", flush=True)
        runs: dict[str, list[list[RunResult]]] = {name: [[] for _ in prompts] for name in configs}
        stats: dict[str, list[dict]] = {name: [] for name in configs}
        for repeat in range(args.repeats):
            for p, (ids, cont) in enumerate(zip(prompts, conts)):
                for name, runner in configs.items():  # interleaved: a noisy minute hits every config
                    runner.activate()
                    if isinstance(runner, Fuzzy):
                        fuzzy.reset_stats()
                    result = simulate(runner, ids, cont, args.k, teacher_forced=False)
                    runs[name][p].append(result)
                    if isinstance(runner, Fuzzy) and repeat == 0:
                        stats[name].append(fuzzy.stats())
                    if repeat == 0:
                        print(f"  {name}: {result.accepted}/{result.drafted} accepted", flush=True)
                    elif result.round_tokens != runs[name][p][0].round_tokens:
                        raise RuntimeError(f"{name}: rounds differ between repeats (nondeterministic draft?)")

        print("teacher-forced agreement ...", flush=True)
        agreement = {}
        for name in ("sequential 1 thread", "fuzzy full, every_round", "fuzzy full, never",
                     "fuzzy attention, every_round", "fuzzy attention, never"):
            runner = configs[name]
            runner.activate()
            rs = [simulate(runner, ids, cont, args.k, teacher_forced=True) for ids, cont in zip(prompts, conts)]
            agreement[name] = sum(r.agree for r in rs) / sum(r.positions for r in rs)
    finally:
        fuzzy.close()

    rows = []
    for name, by_prompt in runs.items():
        rs = [repeats[0] for repeats in by_prompt]  # rounds are deterministic: same in every repeat
        per_token = [
            ms / n for repeats in by_prompt for r in repeats for ms, n in zip(r.round_ms, r.round_tokens)
        ]
        # per round, the fastest of the repeats: what the round costs when no other process intervenes
        best_ms = sum(min(r.round_ms[i] for r in repeats) for repeats in by_prompt for i in range(len(repeats[0].round_ms)))
        best_tokens = sum(sum(repeats[0].round_tokens) for repeats in by_prompt)
        drafted, accepted = sum(r.drafted for r in rs), sum(r.accepted for r in rs)
        row = {
            "config": name,
            "draft_ms_per_token_best_of_repeats": best_ms / best_tokens,
            "draft_ms_per_token_median": statistics.median(per_token),
            "draft_ms_per_token_p10": percentile(per_token, 0.1),
            "acceptance": accepted / drafted,
            "drafted": drafted,
            "rounds": sum(r.rounds for r in rs),
            "agreement_teacher_forced": agreement.get(name),
        }
        if stats[name]:
            s = stats[name]
            n_rounds = sum(r.rounds for r in rs)
            row["calibration_ms_per_round"] = 1e3 * sum(x["calibration_s"] for x in s) / n_rounds
            row["fuzzy_ms_per_pass"] = 1e3 * sum(x["fuzzy_s"] for x in s) / max(1, sum(x["fuzzy_passes"] for x in s))
            row["exchange_ms_per_round"] = 1e3 * sum(x["exchange_s"] for x in s) / n_rounds
            row["exchanges_per_round"] = sum(x["exchange_count"] for x in s) / n_rounds
            row["calibrated_tokens_per_round"] = sum(x["calibrated_tokens"] for x in s) / n_rounds
        rows.append(row)
    best_seq = min(r["draft_ms_per_token_best_of_repeats"] for r in rows if r["config"].startswith("sequential"))
    seq_acceptance = next(r["acceptance"] for r in rows if r["config"] == "sequential 1 thread")
    for r in rows:
        r["speedup_vs_best_sequential"] = best_seq / r["draft_ms_per_token_best_of_repeats"]
        r["acceptance_delta_points"] = 100 * (r["acceptance"] - seq_acceptance)
    report["rows"] = rows
    report["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(render(report))
    print(f"\nwrote {args.out}")


def render(report: dict) -> str:
    lines = [f"EasySpec bench: {report['model']} ({report.get('draft_quantization', 'int8')} draft vs bf16 target), k={report['k']}, "
             f"{report['tokens']} tokens per prompt, plan {report['plan']}",
             f"load average start {tuple(round(x, 2) for x in report['load_average_start'])}, "
             f"end {tuple(round(x, 2) for x in report['load_average_end'])}", ""]
    lines += ["| exchange: all-reduce [T, 576] bf16 | T | median us | p10 us | p90 us |", "|---|---|---|---|---|"]
    for kind, by_t in report["exchange_latency"].items():
        for T, v in (by_t or {}).items():
            lines.append(f"| {kind} | {T} | {v['median_us']:.1f} | {v['p10_us']:.1f} | {v['p90_us']:.1f} |")
    lines += ["", "| single-token pass | median ms | p10 ms |", "|---|---|---|"]
    for name, v in report["pass_ms"].items():
        lines.append(f"| {name} | {v['median_ms']:.2f} | {v['p10_ms']:.2f} |")
    lines += ["", "| drafting stage (rounds of k) | ms/token (best of repeats) | median | speedup vs best sequential | "
              "acceptance | delta (points) | teacher-forced agreement | calibration ms/round | exchange ms/round (count) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        agreement = "" if r["agreement_teacher_forced"] is None else f"{r['agreement_teacher_forced']:.3f}"
        cal = f"{r['calibration_ms_per_round']:.2f}" if "calibration_ms_per_round" in r else ""
        ex = f"{r['exchange_ms_per_round']:.2f} ({r['exchanges_per_round']:.0f})" if "exchange_ms_per_round" in r else ""
        lines.append(
            f"| {r['config']} | {r['draft_ms_per_token_best_of_repeats']:.2f} | {r['draft_ms_per_token_median']:.2f} | "
            f"{r['speedup_vs_best_sequential']:.2f}x | {r['acceptance']:.3f} | {r['acceptance_delta_points']:+.1f} | "
            f"{agreement} | {cal} | {ex} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
