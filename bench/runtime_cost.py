"""Per-pass cost of our runtime against the transformers forward it replaces.

    python -m bench.runtime_cost [--threads 1,2] [--tokens 1,8] [--context 200]

On the embedded default model (SmolLM2-135M-Instruct): the target (bf16), the
drafts (int8, int4 weight-only, bf16 activations) and transformers' own forward
(bf16, with its DynamicCache), each extending a context of ~200 tokens by T new
tokens per pass, then rolling back. Configurations are interleaved over rounds
and the median is reported (the machine is shared and noisy: compare the
load averages printed with the table; the minimum is the uncontended cost). Also reports each
draft's greedy agreement with the bf16 target (teacher-forced, 1-token passes).

Prints a Markdown table; writes JSON to bench/results/runtime_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from workers.model import load_model, load_tokenizer, resolve_checkpoint

EMBEDDED = "embedded:smollm2-135m-instruct"
RESULTS = Path(__file__).resolve().parent / "results" / "runtime_cost.json"
AGREEMENT_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works in simple terms.",
]


class OurRunner:
    """Our LlamaModel over its static KV cache."""

    def __init__(self, model, context: torch.Tensor, capacity: int):
        self.model = model
        self.cache = model.new_cache(capacity)
        self.ctx = len(context)
        model.forward(context, self.cache)

    def step(self, tokens: torch.Tensor) -> None:
        self.model.forward(tokens, self.cache, num_logits=len(tokens))
        self.cache.crop(self.ctx)


class HFRunner:
    """transformers' forward with its DynamicCache (what our runtime replaces)."""

    def __init__(self, model, context: torch.Tensor):
        self.model = model
        out = model(context[None], use_cache=True)
        self.cache = out.past_key_values
        self.ctx = len(context)

    def step(self, tokens: torch.Tensor) -> None:
        self.model(tokens[None], past_key_values=self.cache, use_cache=True, logits_to_keep=len(tokens))
        try:
            self.cache.crop(self.ctx)  # transformers 4: crop to a length
        except ValueError:
            self.cache.crop(self.ctx - self.cache.get_seq_length())  # transformers 5: negative = drop


def agreement(target, draft, tokenizer, new_tokens: int) -> float:
    """Fraction of positions where the draft's greedy token equals the target's (teacher-forced)."""
    agree = total = 0
    for prompt in AGREEMENT_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = torch.tensor(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        tc, dc = target.new_cache(len(ids) + new_tokens + 1), draft.new_cache(len(ids) + new_tokens + 1)
        t_logits, d_logits = target.forward(ids, tc), draft.forward(ids, dc)
        for _ in range(new_tokens):
            tok = t_logits.argmax(-1)
            agree += int(d_logits.argmax(-1).item() == tok.item())
            total += 1
            t_logits, d_logits = target.forward(tok, tc), draft.forward(tok, dc)
    return agree / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=EMBEDDED)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tokens", default="1,8", help="new tokens per pass")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--reps", type=int, default=10, help="timed passes per configuration per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--agreement-tokens", type=int, default=64, help="0 to skip the agreement measurement")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    token_counts = [int(t) for t in args.tokens.split(",")]

    path = resolve_checkpoint(args.model)
    tokenizer = load_tokenizer(path)
    load_start = os.getloadavg()
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    context = torch.randint(0, vocab, (args.context,), generator=gen)
    capacity = args.context + max(token_counts) + 1

    with torch.inference_mode():
        models = {
            "target bf16 (ours)": load_model(path, torch.bfloat16, "none"),
            "draft int8 (ours)": load_model(path, torch.bfloat16, "int8"),
        }
        try:
            models["draft int4 (ours)"] = load_model(path, torch.bfloat16, "int4")
        except ValueError as e:
            print(f"int4 skipped: {e}")
        runners = {name: OurRunner(m, context, capacity) for name, m in models.items()}
        if not args.no_transformers:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            runners["transformers bf16"] = HFRunner(hf, context)

        samples: dict[tuple[str, int, int], list[float]] = {}
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for name, runner in runners.items():  # warm up every shape once
                for T in token_counts:
                    for _ in range(2):
                        runner.step(torch.randint(0, vocab, (T,), generator=gen))
            for _ in range(args.rounds):
                for name, runner in runners.items():
                    for T in token_counts:
                        key = (name, n_threads, T)
                        for _ in range(args.reps):
                            tokens = torch.randint(0, vocab, (T,), generator=gen)
                            t0 = time.perf_counter()
                            runner.step(tokens)
                            samples.setdefault(key, []).append(time.perf_counter() - t0)

        agree = {}
        if args.agreement_tokens > 0:
            torch.set_num_threads(threads[0])
            target = models["target bf16 (ours)"]
            for name, m in models.items():
                if name.startswith("draft"):
                    agree[name] = agreement(target, m, tokenizer, args.agreement_tokens)

    load_end = os.getloadavg()
    rows = []
    for (name, n_threads, T), ts in samples.items():
        ms = statistics.median(ts) * 1e3
        rows.append(
            dict(
                config=name,
                threads=n_threads,
                tokens_per_pass=T,
                ms_per_pass=round(ms, 2),
                ms_per_token=round(ms / T, 2),
                min_ms=round(min(ts) * 1e3, 2),
                p10_ms=round(sorted(ts)[len(ts) // 10] * 1e3, 2),
                p90_ms=round(sorted(ts)[(len(ts) * 9) // 10] * 1e3, 2),
                n=len(ts),
            )
        )
    base = {(r["threads"], r["tokens_per_pass"]): r["ms_per_pass"] for r in rows if r["config"] == "target bf16 (ours)"}
    hf = {(r["threads"], r["tokens_per_pass"]): r["ms_per_pass"] for r in rows if r["config"] == "transformers bf16"}
    for r in rows:
        key = (r["threads"], r["tokens_per_pass"])
        r["vs_target"] = round(r["ms_per_pass"] / base[key], 2) if key in base else None
        r["vs_transformers"] = round(r["ms_per_pass"] / hf[key], 2) if key in hf else None

    header = (
        "| config | threads | tokens/pass | ms/pass (median) | ms/token | min ms/pass | p10-p90 ms "
        "| x target | x transformers |"
    )
    lines = [header, "|" + "---|" * 9]
    for r in sorted(rows, key=lambda r: (r["threads"], r["tokens_per_pass"], r["config"])):
        lines.append(
            f"| {r['config']} | {r['threads']} | {r['tokens_per_pass']} | {r['ms_per_pass']:.2f} | "
            f"{r['ms_per_token']:.2f} | {r['min_ms']:.2f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
            f"{r['vs_target']} | {r['vs_transformers']} |"
        )
    print(f"\nModel {args.model}, context {args.context} tokens, medians of {args.rounds}x{args.reps} passes, "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}\n")
    print("\n".join(lines))
    if agree:
        print("\nGreedy agreement with the bf16 target (teacher-forced, "
              f"{len(AGREEMENT_PROMPTS)} prompts x {args.agreement_tokens} tokens):")
        for name, a in agree.items():
            print(f"- {name}: {a:.3f}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            dict(
                model=args.model,
                context=args.context,
                rounds=args.rounds,
                reps=args.reps,
                torch=torch.__version__,
                machine=platform.machine(),
                cpu_count=os.cpu_count(),
                load_average_start=load_start,
                load_average_end=load_end,
                rows=rows,
                greedy_agreement=agree,
            ),
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
