"""Prompt lookup against the target alone, in one process, by CPU time (robust to a busy machine).

    python -m bench.lookup_cost --config configs/qwen2.5-coder.yaml \\
        --prompts bench/prompts.jsonl,bench/prompts-grounded.jsonl [--limit 8] [--max-tokens 64] [--k 3,6]

Loads the config's target once (one thread) and, for each prompt in turn, runs it greedily
through the verify engine as `ar` (no drafts) and as `lookup` with each k, back to back. Per
prompt file and run it reports target passes, drafts proposed and accepted, tokens per pass,
CPU seconds per token (time.process_time: the time the process ran, which a loaded machine
inflates far less than wall time) and its ratio to `ar`, and whether every output equals `ar`'s.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bench.harness import load_prompts
from configs.loader import load_config
from protocol.messages import GenerateRequest, SamplingParams
from workers.engine import NoDraft, VerifyEngine
from workers.engine.prompt_lookup import PromptLookup
from server.launcher import eos_token_ids
from workers.model import load_model, load_tokenizer, resolve_checkpoint
from workers.model.dtypes import compute_dtype


def prompt_ids(tokenizer, prompt) -> list[int]:
    if prompt.kind == "chat":
        messages = [{"role": "user", "content": prompt.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt.prompt)


def serve(engine: VerifyEngine, ids: list[int], max_tokens: int, stop: list[int]) -> dict:
    """One greedy request to completion: its tokens, passes, drafts, accepted, CPU and wall seconds."""
    cpu, wall = time.process_time(), time.perf_counter()
    engine.add(GenerateRequest("r", ids, max_tokens, SamplingParams(), stop))
    out = {"tokens": [], "passes": 0, "drafted": 0, "accepted": 0}
    first = 0
    while engine.has_work:
        for o in engine.step():
            if not out["tokens"]:  # the prefill and first token: the same for every run, left out
                cpu, wall, first = time.process_time(), time.perf_counter(), len(o.token_ids)
            out["tokens"] += o.token_ids
            out["passes"] += 1
            out["drafted"] += o.num_draft_tokens
            out["accepted"] += o.num_accepted_tokens
    out["cpu_s"], out["wall_s"] = time.process_time() - cpu, time.perf_counter() - wall
    out["decoded"] = len(out["tokens"]) - first
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/qwen2.5-coder.yaml")
    ap.add_argument("--prompts", default="bench/prompts.jsonl,bench/prompts-grounded.jsonl")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", default="3,6", help="drafts per round, one lookup run each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    path = resolve_checkpoint(config.target.path)
    tokenizer = load_tokenizer(path)
    model = load_model(path, compute_dtype(config.target.dtype, "cpu", config.target.quantization), config.target.quantization)
    stop = list(eos_token_ids(path, tokenizer))
    spec = config.speculation
    sources = {"ar": lambda: NoDraft()} | {
        f"lookup k={k}": (lambda k=k: PromptLookup(num_draft_tokens=k, min_n=spec.prompt_lookup_min, max_n=spec.prompt_lookup_max))
        for k in (int(x) for x in args.k.split(","))
    }
    engine_args = dict(max_model_len=config.scheduler.max_model_len, max_running=1)
    print(f"| prompts | run | tokens | passes | tokens / pass | acceptance | CPU ms / token | vs ar (CPU) | vs ar (wall) | identical |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        warm = VerifyEngine(model, NoDraft(), **engine_args)
        serve(warm, prompt_ids(tokenizer, load_prompts(args.prompts.split(",")[0], 1)[0]), 8, stop)
        for file in args.prompts.split(","):
            totals: dict[str, dict] = defaultdict(lambda: defaultdict(float))
            for prompt in load_prompts(file, args.limit):
                ids = prompt_ids(tokenizer, prompt)
                reference = None
                for name, source in sources.items():  # back to back on each prompt
                    got = serve(VerifyEngine(model, source(), **engine_args), ids, args.max_tokens, stop)
                    reference = reference or got["tokens"]
                    t = totals[name]
                    for key in ("passes", "drafted", "accepted", "cpu_s", "wall_s"):
                        t[key] += got[key]
                    t["tokens"] += len(got["tokens"])
                    t["decoded"] += got["decoded"]
                    t["identical"] += got["tokens"] == reference
                    t["n"] += 1
            ar = totals["ar"]
            for name, t in totals.items():
                acceptance = f"{t['accepted'] / t['drafted']:.1%}" if t["drafted"] else "-"
                cpu_per_token = t["cpu_s"] / t["decoded"]
                print(
                    f"| {file.rsplit('/', 1)[-1]} | {name} | {t['tokens']:.0f} | {t['passes']:.0f} | "
                    f"{t['tokens'] / t['passes']:.2f} | {acceptance} | {1000 * cpu_per_token:.1f} | "
                    f"{(ar['cpu_s'] / ar['decoded']) / cpu_per_token:.2f}x | "
                    f"{(ar['wall_s'] / ar['decoded']) / (t['wall_s'] / t['decoded']):.2f}x | {t['identical']:.0f}/{t['n']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
