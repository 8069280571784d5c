"""A forward pass's time on a GPU, for the target and the draft of a config, against the floor.

    python -m bench.gpu_pass --config configs/gpu-1x.yaml [--device cuda:0] [--tokens 1,5] \\
        [--batch 1,16] [--context 200] [--reps 50]

For each model as the config loads it, onto --device: ms per pass (CUDA events, median of
--reps after warm-up) for B requests of T new tokens each over `--context` cached positions
(B = 1 is one request's decode step or verification; B > 1 one batched step of the engine,
`forward_batch`), and the floor: bytes of weights and KV a pass reads over the device's copy
bandwidth measured here. A small model's pass on a big GPU sits far above the floor: kernel
launches, not bytes, set its time, which is what this shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.pass_cost import weight_bytes
from configs.loader import load_config
from workers.model import load_model, resolve_checkpoint
from workers.model.dtypes import compute_dtype
from workers.model.model import Segment

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_pass.json"


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * 5 * nbytes / (start.elapsed_time(end) / 1e3) / 1e9


def pass_ms(model, B: int, T: int, context: int, reps: int, gen: torch.Generator) -> float:
    """Median ms of one pass of B requests x T tokens (each over `context` cached tokens)."""
    vocab = model.args.vocab_size
    caches = [model.new_cache(context + T + 1) for _ in range(B)]
    for cache in caches:
        model.forward(torch.randint(0, vocab, (context,), generator=gen), cache, 0)
    tokens = [torch.randint(0, vocab, (T,), generator=gen).to(model.device) for _ in range(B)]

    def step() -> None:
        if B == 1:
            model.forward(tokens[0], caches[0], T)
        else:
            model.forward_batch([Segment(t, c, T) for t, c in zip(tokens, caches)])
        for cache in caches:
            cache.crop(context)

    for _ in range(5):
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gpu-1x.yaml")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tokens", default="1,5", help="new tokens per request per pass")
    ap.add_argument("--batch", default="1,16", help="requests per pass")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.cuda.set_device(device)
    config = load_config(args.config)
    bandwidth = copy_bandwidth_gbs(device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for role, section in (("target", config.target), ("draft", config.draft)):
            model = load_model(resolve_checkpoint(section.path), compute_dtype(section.dtype, device, section.quantization), section.quantization,
                               device=device, head_vocab=section.head_vocab)
            for B in (int(b) for b in args.batch.split(",")):
                for T in (int(t) for t in args.tokens.split(",")):
                    ms = pass_ms(model, B, T, args.context, args.reps, gen)
                    nbytes = weight_bytes(model, B * T, args.context)
                    floor = nbytes / (bandwidth * 1e9) * 1e3
                    rows.append(dict(model=f"{role} ({section.dtype}, {section.quantization})", batch=B, tokens=T,
                                     ms_per_pass=round(ms, 3), tokens_per_s=round(B * T / ms * 1e3, 1),
                                     mb_read=round(nbytes / 1e6, 1), floor_ms=round(floor, 4),
                                     x_floor=round(ms / floor, 1)))
            del model
            torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name(device)}, {args.config}, context {args.context}, "
          f"copy bandwidth {bandwidth:.0f} GB/s, medians of {args.reps} passes\n")
    print("| model | requests | tokens each | ms/pass | rows/s | MB read | floor ms | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['tokens']} | {r['ms_per_pass']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['mb_read']:.0f} | {r['floor_ms']:.3f} | {r['x_floor']:.0f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(config=args.config, device=torch.cuda.get_device_name(device),
                                         bandwidth_gbs=bandwidth, rows=rows), indent=1))


if __name__ == "__main__":
    main()
