"""Where a forward pass's time goes, for the target and the draft of a config, against the floor.

    python -m bench.pass_cost --config configs/qwen2.5-coder.yaml [--threads 1,2] [--tokens 1,5] \\
        [--context 200] [--rounds 5] [--reps 4] [--agreement-tokens 64]

For each model as the config loads it (quantization, reduced draft head), and each thread count
and tokens-per-pass T (1 = a decode step, k+1 = a verification of k drafts):
- ms per pass (median over rounds; min = the least contended), ms per token;
- the floor: bytes of weights a pass reads (every linear, the norms, one embedding row per
  token; the KV cache read at this context) divided by the memory bandwidth measured here with
  the same thread count (a streaming sum over 1 GiB);
- each twice, alternated in the same rounds: with the decoder layers in one kernel call
  (workers/model/layers.py, where the model takes it: "one call") and layer by layer from
  Python ("Python"), the path a prefill, bf16 or a GPU takes;
- where the time goes, on the layer-by-layer path (the one call has no Python to wrap): ms per
  pass in each kind of linear (int4 blocks, dense bf16, the head), in attention outside its
  linears, and the rest (norms, RoPE, Python).
Also the draft's greedy agreement with the target (teacher-forced), the acceptance a greedy
draft can get at best. Prints Markdown; writes bench/results/pass_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.runtime_cost import AGREEMENT_PROMPTS, OurRunner, agreement
from configs.loader import load_config
from workers.model import load_model, load_tokenizer, resolve_checkpoint
from workers.model.dtypes import compute_dtype
from workers.model.linear import ConcatLinear, Int4Linear, Int8Linear, RowWise
from workers.model.model import TwoRowFloor
from workers.model.qlinear import QLinear

RESULTS = Path(__file__).resolve().parent / "results" / "pass_cost.json"
LAYER_PATHS = {"one call": True, "Python": False}  # label -> LlamaModel.fuse_layers


def bandwidth_gbs(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Streaming read bandwidth (GB/s): the best of `reps` sums over `nbytes` of float32."""
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(x.sum) for _ in range(reps))
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def linear_bytes(module: torch.nn.Module) -> int:
    """Bytes of weights one pass reads through this linear (whatever its storage)."""
    if isinstance(module, ConcatLinear):
        return sum(linear_bytes(p) for p in module.parts)
    if isinstance(module, (RowWise, TwoRowFloor)):
        return linear_bytes(module.inner)
    if isinstance(module, (Int4Linear, Int8Linear, QLinear)):
        return sum(b.numel() * b.element_size() for b in module.buffers())
    if hasattr(module, "rows"):  # a reduced (FR-Spec) head
        return linear_bytes(module.rows)
    dtype_size = torch.finfo(module.bias.dtype if getattr(module, "bias", None) is not None else torch.bfloat16).bits // 8
    try:
        dtype_size = next(p for p in module.parameters() if not p.is_mkldnn).element_size()
    except (StopIteration, RuntimeError):
        pass
    return module.in_features * module.out_features * dtype_size


def weight_bytes(model, tokens: int, context: int) -> int:
    """Bytes a pass of `tokens` new tokens over `context` cached ones reads."""
    total = 0
    for name, module in model.named_modules():
        if name == "output" or (name.endswith(("wqkv", "wo", "w13", "w2")) and ".parts." not in name):
            total += linear_bytes(module)
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    emb = model.tok_embeddings.weight
    a = model.args
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * (context + tokens) * emb.element_size()
    return total + norms + tokens * emb.shape[1] * emb.element_size() + kv


def kind_of(name: str, module: torch.nn.Module) -> str:
    if name == "output":
        return "head (" + type(module).__name__ + ")"
    if isinstance(module, ConcatLinear):
        return "linears: mixed (" + " + ".join(kind_of("", p).removeprefix("linears: ") for p in module.parts) + ")"
    if isinstance(module, QLinear):
        return f"linears: qgemm {module.kind}"
    if isinstance(module, RowWise):
        return kind_of(name, module.inner) + " row-wise"
    if isinstance(module, TwoRowFloor):
        return kind_of(name, module.inner)
    if isinstance(module, Int4Linear):
        return "linears: int4"
    if isinstance(module, Int8Linear):
        return "linears: int8"
    return "linears: dense " + str(model_dtype(module))


def model_dtype(module) -> str:
    for p in module.parameters():
        return str(p.dtype).replace("torch.", "")
    return "?"


def breakdown(model, runner: OurRunner, T: int, vocab: int, reps: int, gen) -> dict[str, float]:
    """ms per pass in each kind of module (wrapped forwards; attention net of its linears)."""
    acc: dict[str, float] = defaultdict(float)
    originals = []

    def wrap(module, keys):
        forward = module.forward

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = forward(*a, **k)
            for key in keys:
                acc[key] += time.perf_counter() - t0
            return out

        originals.append((module, forward))
        module.forward = timed

    for name, module in model.named_modules():
        short = name.split(".")[-1]
        if name == "output" or (short in ("wqkv", "wo", "w13", "w2") and ".parts." not in name):
            wrap(module, [kind_of(name, module)] + (["_attention linears"] if short in ("wqkv", "wo") else []))
    for layer in model.layers:
        wrap(layer.attention, ["_attention"])
    model.fuse_layers = False  # the layer-by-layer path: its modules' forwards are what is wrapped
    try:
        runner.step(torch.randint(0, vocab, (T,), generator=gen))
        acc.clear()
        t0 = time.perf_counter()
        for _ in range(reps):
            runner.step(torch.randint(0, vocab, (T,), generator=gen))
        total = (time.perf_counter() - t0) / reps * 1e3
    finally:
        for module, forward in originals:
            module.forward = forward
        model.fuse_layers = True
    out = {k: v / reps * 1e3 for k, v in acc.items()}
    attention = out.pop("_attention") - out.pop("_attention linears")
    linears = sum(out.values())
    out["attention (outside its linears)"] = attention
    out["rest (norms, RoPE, embedding, Python)"] = total - linears - attention
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/qwen2.5-coder.yaml")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="1,5", help="new tokens per pass")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--agreement-tokens", type=int, default=64, help="0 to skip")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]
    config = load_config(args.config)
    load_start = os.getloadavg()

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        models, tokenizer = {}, None
        for role, section in (("target", config.target), ("draft", config.draft)):
            path = resolve_checkpoint(section.path)
            tokenizer = tokenizer or load_tokenizer(path)
            t0 = time.perf_counter()
            models[role] = load_model(
                path, compute_dtype(section.dtype, "cpu", section.quantization), section.quantization, head_vocab=section.head_vocab
            )
            label = f"{role} ({section.quantization}{', head ' + str(section.head_vocab) if section.head_vocab else ''})"
            print(f"loaded {label} in {time.perf_counter() - t0:.1f} s")
            models[label] = models.pop(role)
        vocab = len(tokenizer)
        context = torch.randint(0, vocab, (args.context,), generator=gen)
        capacity = args.context + max(token_counts) + 1
        runners = {name: OurRunner(m, context, capacity) for name, m in models.items()}

        bandwidth = {n: bandwidth_gbs(n) for n in threads}
        samples: dict[tuple[str, int, int, str], list[float]] = defaultdict(list)
        parts: dict[tuple[str, int, int], dict[str, float]] = {}
        for n in threads:
            torch.set_num_threads(n)
            for name, runner in runners.items():
                for T in token_counts:
                    parts[(name, n, T)] = breakdown(models[name], runner, T, vocab, args.reps, gen)
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    paths = LAYER_PATHS if models[name].decode_layers() is not None else {"Python": False}
                    for T in token_counts:
                        for path, fused in paths.items():
                            models[name].fuse_layers = fused
                            for _ in range(args.reps):
                                tokens = torch.randint(0, vocab, (T,), generator=gen)
                                samples[(name, n, T, path)].append(_timed(lambda: runner.step(tokens)))
                        models[name].fuse_layers = True
        agree = None
        if args.agreement_tokens:
            torch.set_num_threads(max(threads))
            target, draft = list(models.values())
            agree = agreement(target, draft, tokenizer, args.agreement_tokens)

    rows = []
    for (name, n, T, path), ts in samples.items():
        ms = statistics.median(ts) * 1e3
        nbytes = weight_bytes(models[name], T, args.context)
        floor = nbytes / (bandwidth[n] * 1e9) * 1e3
        rows.append(dict(model=name, threads=n, tokens_per_pass=T, layers=path, ms_per_pass=round(ms, 2),
                         min_ms=round(min(ts) * 1e3, 2), ms_per_token=round(ms / T, 2),
                         mb_read=round(nbytes / 1e6, 1), bandwidth_gbs=round(bandwidth[n], 1),
                         floor_ms=round(floor, 2), x_floor=round(ms / floor, 2),
                         breakdown_ms={k: round(v, 2) for k, v in parts[(name, n, T)].items()}))
    load_end = os.getloadavg()
    print(f"\n{args.config}, context {args.context}, medians of {args.rounds}x{args.reps} passes; "
          f"bandwidth {', '.join(f'{n} thread(s) {b:.1f} GB/s' for n, b in bandwidth.items())}; "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}\n")
    print("| model | threads | tokens/pass | layers | ms/pass | min | ms/token | MB read | floor ms | x floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['threads']} | {r['tokens_per_pass']} | {r['layers']} | {r['ms_per_pass']:.1f} | {r['min_ms']:.1f} | "
              f"{r['ms_per_token']:.1f} | {r['mb_read']:.0f} | {r['floor_ms']:.1f} | {r['x_floor']:.1f} |")
    print("\nWhere a layer-by-layer pass goes (ms, one breakdown run each; wrapping adds a little):\n")
    for r in rows:
        if r["layers"] != "Python":
            continue
        parts_text = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["breakdown_ms"].items(), key=lambda kv: -kv[1]))
        print(f"- {r['model']}, {r['threads']} thr, T={r['tokens_per_pass']}: {parts_text}")
    if agree is not None:
        print(f"\nDraft greedy agreement with the target (teacher-forced, {len(AGREEMENT_PROMPTS)} prompts x "
              f"{args.agreement_tokens} tokens): {agree:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(config=args.config, context=args.context, bandwidth_gbs=bandwidth,
                                         load_average=[load_start, load_end], rows=rows, agreement=agree), indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
