"""``python -m bench.prefix_ttft``: time to first token with and without a prefix-cache hit.

    python -m bench.prefix_ttft --url http://127.0.0.1:8000 --prefix-words 1500 --rounds 3 [--json out.json]

Each round sends, one after the other (streaming, greedy, 4 tokens), a request whose
prompt is a long prefix new to the server (about --prefix-words tokens of filler words,
shuffled by the round: a miss) and then one with the same prefix and another question
(a hit, where the server caches prefixes). Reported: TTFT p50 of the misses and of the
hits, their ratio, and the server's tandem:prefix_cache_hits_total / _queries_total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.load import Plan, _send, fetch_model
from bench.prefill_stall import _FILLER


def prefix(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_FILLER) for _ in range(num_words))


async def ttft(client: httpx.AsyncClient, model: str, prompt: str) -> float:
    result = await _send(client, Plan(0, prompt, chat=False, stream=True, seed=None, max_tokens=4), model)
    if not result.ok or result.first_token is None:
        raise SystemExit(f"request failed: {result.error}")
    return result.first_token - result.start


def prefix_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        f"{sample.name}{{role={sample.labels.get('role')}}}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("tandem:prefix_cache_")
    }


async def run(url: str, prefix_words: int, rounds: int) -> dict:
    model = await fetch_model(url)
    misses, hits = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for r in range(rounds):
            shared = prefix(prefix_words, seed=1000 + r)
            misses.append(await ttft(client, model, shared + "\n\nQuestion: which word comes first? Answer:"))
            hits.append(await ttft(client, model, shared + "\n\nQuestion: which word comes last? Answer:"))
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {"prefix_words": prefix_words, "rounds": rounds, "ttft_miss_s": misses, "ttft_hit_s": hits,
            "ttft_miss_p50_s": miss, "ttft_hit_p50_s": hit, "hit_over_miss": hit / miss,
            "counters": prefix_counters(url)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_ttft", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--prefix-words", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    report = asyncio.run(run(args.url.rstrip("/"), args.prefix_words, args.rounds))
    print(f"TTFT p50: miss {report['ttft_miss_p50_s']:.3f} s, hit {report['ttft_hit_p50_s']:.3f} s "
          f"(hit/miss {report['hit_over_miss']:.2f}); " + ", ".join(f"{k} {v:g}" for k, v in report["counters"].items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
