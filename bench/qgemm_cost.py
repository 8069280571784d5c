"""One quantized linear's cost here: the qgemm kernel (each variant this CPU runs) against torch's
int4 kernel (what `quantization: gguf` falls back to for 4-bit blocks without qgemm), and the floor.

    python -m bench.qgemm_cost [--shape 1536x8960] [--rows 1,5] [--threads 1,2] [--reps 50]

Random Q4_K-like weights (4-bit q, six-bit scales and mins per 32, d and dmin per 256) of shape
K x N (in x out: 1536x8960 is a Qwen2.5-1.5B gate or up projection), in COPIES copies whose
bytes exceed the last-level cache, called in turn, so every call reads its weights from memory
as a model's pass does; inputs in the dtype `dtype: auto` resolves to here (bf16 where the CPU
computes it natively, else float32). Per (kernel, threads, rows): ms a call
(median over reps, and the min: the least contended) and GB/s of weights read. The floor is the
weight bytes over the streaming read bandwidth at that thread count (pass_cost's measure).
Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from bench.pass_cost import bandwidth_gbs
from workers.model.dtypes import compute_dtype
from workers.model.linear import Int4Linear, Int4Parts
from workers.model.qlinear import QLinear, QuantParts, kernel, machine_variants

COPIES = 8  # 8 x 7.3 MB of Q4_K at 1536x8960: past a 32 MiB L3


def q4k_parts(N: int, K: int, seed: int) -> QuantParts:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    sc, m = (torch.randint(0, 64, (N, K // 32), generator=g, dtype=torch.uint8) for _ in range(2))
    d, dmin = (torch.rand(N, K // 256, generator=g) * 0.01 for _ in range(2))
    scales = d.repeat_interleave(8, dim=1) * sc.float()
    offsets = -dmin.repeat_interleave(8, dim=1) * m.float()
    return QuantParts(q, scales, offsets, 0.0, 32, True, (sc, m, d, dmin))


def int4_of(p: QuantParts, dtype: torch.dtype) -> Int4Linear:
    """The fallback's module for the same weights: w = (q - 8) * s + zero, zero = o + 8 s."""
    return Int4Linear(Int4Parts(p.q.int(), p.scales, p.offsets + 8 * p.scales), None, dtype, "cpu")


def qgemm_bytes(lin: QLinear) -> int:
    return sum(t.numel() * t.element_size() for t in (lin.weight, lin.scales, lin.offsets, lin.super_scales))


def ms_per_call(modules: list, x: torch.Tensor, reps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for module in modules:  # warm-up: first calls, page faults
            module(x)
        for _ in range(reps):
            for module in modules:
                t0 = time.perf_counter()
                module(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def print_cost_table(kernels: dict[str, list], nbytes: int, threads: str, rows: str, reps: int,
                     inputs: Callable[[int], torch.Tensor], flops_per_row: int | None = None) -> None:
    """One Markdown row per (threads, rows, kernel): ms a call (median over reps, and the min),
    GB/s of the `nbytes` of weights at the min (and GFLOP/s, given the flops of a row), and the
    floor (those bytes over the streaming bandwidth at that thread count). threads, rows: "1,2"."""
    flops = " GFLOP/s (min) |" if flops_per_row else ""
    print(f"| kernel | threads | rows | ms/call median | min | GB/s (min) |{flops} floor ms |")
    print("|---|---|---|---|---|---|" + ("---|" if flops_per_row else "") + "---|")
    for n_threads in map(int, threads.split(",")):
        floor = nbytes / (bandwidth_gbs(n_threads, 1 << 29) * 1e9) * 1e3
        torch.set_num_threads(n_threads)
        for M in map(int, rows.split(",")):
            x = inputs(M)
            for name, mods in kernels.items():
                t = ms_per_call(mods, x, reps)
                best = min(t)
                rate = f" {flops_per_row * M / best / 1e6:.1f} |" if flops_per_row else ""
                print(f"| {name} | {n_threads} | {M} | {statistics.median(t):.3f} | {best:.3f} | "
                      f"{nbytes / best / 1e6:.1f} |{rate} {floor:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536x8960", help="K x N (in x out)")
    ap.add_argument("--rows", default="1,5")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    K, N = map(int, args.shape.split("x"))
    dtype = compute_dtype("auto", "cpu", "gguf")
    parts = [q4k_parts(N, K, seed) for seed in range(COPIES)]
    kernels = {}
    for variant in machine_variants():
        mods = [QLinear(p, None, dtype) for p in parts]
        for mod in mods:
            mod.lib = kernel(variant)
        kernels[f"qgemm {variant}"] = mods
    kernels["torch int4 (fallback)"] = [int4_of(p, dtype) for p in parts]
    nbytes = qgemm_bytes(kernels[next(iter(kernels))][0]) if machine_variants() else K * N // 2
    print(f"Q4_K-like {K}x{N}, {str(dtype)[6:]} inputs: {nbytes / 1e6:.2f} MB of weights and scales a call "
          f"(qgemm's layout), {COPIES} copies\n")
    print_cost_table(kernels, nbytes, args.threads, args.rows, args.reps, lambda M: torch.randn(M, K).to(dtype))


if __name__ == "__main__":
    main()
