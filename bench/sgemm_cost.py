"""One dense float32 linear's cost here: Tandem's kernel (Float32Linear, kernels/sgemm.c) against
torch's (oneDNN prepacked, as PackedLinear serves it, and plain F.linear), and the floor.

    python -m bench.sgemm_cost [--shape 576x3072] [--rows 1,2,4,8,16,32,80] [--threads 2] [--reps 20]

Random weights of shape K x N (in x out: 576x3072 is SmolLM2-135M's fused gate and up
projection) in copies whose bytes exceed the last-level cache, called in turn, so every call
reads its weights from memory as a model's pass does. Per (kernel, threads, rows): ms a call
(median over reps, and the min), GB/s of weights read and GFLOP/s at the min. The floor is the
weight bytes over the streaming read bandwidth at that thread count (pass_cost's measure).
Prints Markdown.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from bench.qgemm_cost import print_cost_table
from workers.model.linear import Float32Linear, PackedLinear, mkldnn_packing_ok

LLC_BYTES = 64 << 20  # copies enough to read past a 32 MiB L3 twice over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="576x3072", help="K x N (in x out)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,80")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    K, N = map(int, args.shape.split("x"))
    nbytes = K * N * 4
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(N, K, generator=g) for _ in range(max(2, -(-LLC_BYTES // nbytes)))]
    kernels = {"tandem sgemm": [Float32Linear(w, None) for w in weights]}
    if mkldnn_packing_ok(torch.device("cpu"), torch.float32):
        kernels["torch oneDNN packed"] = [PackedLinear(w, None, torch.float32) for w in weights]
    kernels["torch F.linear"] = [partial(F.linear, weight=w) for w in weights]
    print(f"float32 {K}x{N}: {nbytes / 1e6:.2f} MB of weights a call, {len(weights)} copies\n")
    print_cost_table(kernels, nbytes, args.threads, args.rows, args.reps, lambda M: torch.randn(M, K, generator=g),
                     flops_per_row=2 * K * N)


if __name__ == "__main__":
    main()
