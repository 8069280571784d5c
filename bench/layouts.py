"""Where `sd`, `amusd` and `easyspec` pay on G devices: a cost model, checked
against the CPU points measured here (README, Benchmarks). Pure functions.

    python -m bench.layouts        # the table for 2, 4 and 8 GPUs, then the CPU check

Symbols (costs in units of one target decode step on ONE device, T1 = 1):
  a    per-token acceptance rate (draft token i accepted given i-1 were)
  k    drafts per verification
  E    tokens per verification, bonus included: (1 - a^(k+1)) / (1 - a)
  c    draft cost per token, on one device
  v    cost of verifying k+1 tokens / cost of one decode step (GPU ~1.1: memory bound)
  T(D) target step on D devices, tensor parallel: 1 / (1 + e (D - 1)), e = TP efficiency
  m    messaging per round: 2 one-way latencies (verified prefix out, last draft back)

  ar        (target TP over G)            speed 1 / T(G)
  sd        (target TP-G, draft in turn)  round = k c + v T(G) + m;                     E / round
  amusd     (target TP-(G-1), draft on 1, concurrently)
            round = max(v T(G-1) + m, E c) + (1 - a^k) c   (after a rejection the target waits
            for the draft's first new token);                                           E / round
  easyspec  (target TP-G; draft layers in parallel groups over the G devices, rounds in turn)
            c_f = c (s + (1 - s) / G) (1 + x)   s: share of layers kept sequential, x: exchange
            round = k c_f + c v (calibration: one exact pass over the verified tokens) + v T(G) + m,
            at a lower acceptance a_f;                                                   E(a_f) / round
Speed-up = speed / ar's speed. The model ignores batching (one request).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


def tokens_per_round(a: float, k: int) -> float:
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def tp_step(devices: int, efficiency: float) -> float:
    return 1.0 / (1 + efficiency * (devices - 1))


@dataclass(frozen=True)
class Setting:
    a: float  # acceptance
    c: float  # draft / target cost per token (one device each)
    k: int = 4
    v: float = 1.1  # verify k+1 tokens / decode 1
    e: float = 0.85  # TP efficiency (NVLink-class)
    m: float = 0.01  # messaging per round (2 x ~30 µs ipc/tcp against a ~6 ms step)
    s: float = 8 / 30  # EasySpec: layers kept sequential (4 + 4 of a 30-layer draft)
    x: float = 0.1  # EasySpec: hidden-state exchange overhead
    a_fuzzy_drop: float = 0.1  # EasySpec: acceptance lost to the fuzzy (layer-parallel) draft


def sd(p: Setting, g: int) -> float:
    ar = tp_step(g, p.e)
    return tokens_per_round(p.a, p.k) * ar / (p.k * p.c + p.v * ar + p.m)


def amusd(p: Setting, g: int) -> float:
    if g < 2:
        return float("nan")
    e_k = tokens_per_round(p.a, p.k)
    round_cost = max(p.v * tp_step(g - 1, p.e) + p.m, e_k * p.c) + (1 - p.a**p.k) * p.c
    return e_k * tp_step(g, p.e) / round_cost


def easyspec(p: Setting, g: int) -> float:
    ar = tp_step(g, p.e)
    c_fuzzy = p.c * (p.s + (1 - p.s) / g) * (1 + p.x)
    round_cost = p.k * c_fuzzy + p.c * p.v + p.v * ar + p.m
    return tokens_per_round(max(p.a - p.a_fuzzy_drop, 0.0), p.k) * ar / round_cost


MODES = {"sd": sd, "amusd": amusd, "easyspec": easyspec}


def table(devices=(2, 4, 8), drafts=(0.02, 0.05, 0.1, 0.2), acceptances=(0.7, 0.85)) -> str:
    lines = ["| GPUs | c | a | sd | amusd | easyspec | best |", "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for g in devices:
        for c in drafts:
            for a in acceptances:
                p = Setting(a=a, c=c)
                speeds = {name: f(p, g) for name, f in MODES.items()}
                best = max(speeds, key=speeds.get)
                best = best if speeds[best] > 1 else "ar"
                cells = " | ".join(f"{s:.2f}x" for s in speeds.values())
                lines.append(f"| {g} | {c} | {a} | {cells} | {best} |")
    return "\n".join(lines)


# Measured on the 2-core CPU (README, "Against llama.cpp" and "Where the time goes"):
# Qwen2.5-Coder 1.5B target / 0.5B draft, ms per pass. sd: both models on 2 threads in
# turn, 3.07 tokens per pass, ~10 ms per round of OpenMP hand-over; amusd: a core each,
# 2.36 tokens per pass at 77.5% acceptance.
CPU_POINTS = {
    "sd": {"ar_ms": 32.2, "round_ms": 4 * 14.6 + 46.1 + 10, "tokens": 3.07, "measured": 0.85},
    "amusd": {
        "ar_ms": 32.2,
        "round_ms": max(78.9, 2.36 * 19.9) + (1 - 0.775**4) * 19.9,
        "tokens": 2.36,
        "measured": 0.89,
    },
}


def cpu_check() -> str:
    lines = ["| CPU point (Qwen pair) | round, ms (model) | tokens / round | model | measured |",
             "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for mode, p in CPU_POINTS.items():
        model = p["tokens"] * p["ar_ms"] / p["round_ms"]
        lines.append(f"| {mode} | {p['round_ms']:.1f} | {p['tokens']} | {model:.2f}x | {p['measured']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(table())
    print()
    print(cpu_check())


if __name__ == "__main__":
    main()
