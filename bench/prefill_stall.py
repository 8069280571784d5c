"""``python -m bench.prefill_stall``: what a long prompt arriving mid-load does to the
streams already running (chunked prefill's reason to exist).

    python -m bench.prefill_stall --url http://127.0.0.1:8000 --clients 4 \\
        --long-prompt-tokens 1500 --long-after 2.0 [--max-tokens 128] [--json out.json]

`--clients` streaming greedy requests run (each client sends its next request when one
ends); `--long-after` seconds in, one more request brings a prompt of about
`--long-prompt-tokens` tokens (the server's `usage.prompt_tokens` gives the exact count).
(It first sizes the prompt with two one-token requests, reading their usage.)
Reported: the inter-token latency (ITL: gap between two chunks that carry text) of the
other streams, p50/p99/max, over the whole run and over the window from the long
request's send to its first token (its prefill), and that request's time to first token.
Run it against a server with chunked prefill (`scheduler.prefill_chunk_tokens: 512`) and
without (`--set scheduler.prefill_chunk_tokens=4096`) to see what chunking buys.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

from bench.load import DEFAULT_PROMPTS, Plan, Result, _send, fetch_model, load_prompt_texts, percentile

# words that tokenize to about one token each in the BPE vocabularies Tandem serves
_FILLER = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon omega".split()


def long_prompt(num_words: int) -> str:
    """num_words filler words, then a question that wants an answer."""
    words = [_FILLER[i % len(_FILLER)] for i in range(max(1, num_words))]
    return " ".join(words) + "\n\nHow many times does the word alpha appear above? Answer:"


async def words_for(client: httpx.AsyncClient, model: str, num_tokens: int) -> int:
    """How many filler words make a prompt of about num_tokens tokens on this server's
    tokenizer (measured from usage.prompt_tokens of two one-token completions)."""
    counts = []
    for words in (100, 200):
        response = await client.post("/v1/completions", json={"model": model, "prompt": long_prompt(words),
                                                               "max_tokens": 1, "temperature": 0.0})
        response.raise_for_status()
        counts.append(response.json()["usage"]["prompt_tokens"])
    per_word = (counts[1] - counts[0]) / 100
    return max(1, round((num_tokens - (counts[0] - 100 * per_word)) / per_word))


def gaps_in(results: list[Result], start: float, end: float) -> list[float]:
    """ITL gaps of the streams (b - a for consecutive text chunks) that end inside [start, end]."""
    return [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:]) if start <= b <= end]


def _ms(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50_ms": None if not values else percentile(values, 50) * 1e3,
        "p99_ms": None if not values else percentile(values, 99) * 1e3,
        "max_ms": None if not values else max(values) * 1e3,
    }


async def run(url: str, clients: int, long_tokens: int, long_after_s: float, max_tokens: int,
              duration_s: float, prompts: list[str]) -> dict:
    url = url.rstrip("/").removesuffix("/v1")
    model = await fetch_model(url)
    streams: list[Result] = []
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        long_words = await words_for(client, model, long_tokens)

        async def background(worker: int) -> None:
            index = worker
            while time.perf_counter() < deadline:
                plan = Plan(index=index, prompt=prompts[index % len(prompts)], chat=False, stream=True,
                            seed=None, max_tokens=max_tokens)
                streams.append(await _send(client, plan, model))
                index += clients

        async def intruder() -> Result:
            await asyncio.sleep(long_after_s)
            plan = Plan(index=-1, prompt=long_prompt(long_words), chat=False, stream=True, seed=None, max_tokens=8)
            return await _send(client, plan, model)

        tasks = [asyncio.create_task(background(i)) for i in range(clients)]
        long = await intruder()
        await asyncio.gather(*tasks)
    if not long.ok:
        raise RuntimeError(f"the long request failed: {long.status} {long.error}")
    # its prefill ends at its first text chunk, or at its end if it stopped before any text
    prefilled = long.first_token if long.first_token is not None else long.end
    failed = [r for r in streams if not r.ok]
    window = gaps_in(streams, long.start, prefilled)
    everything = gaps_in(streams, 0.0, float("inf"))
    return {
        "clients": clients,
        "streams": len(streams),
        "failed": len(failed),
        "long_prompt_tokens": long_tokens,
        "long_ttft_s": prefilled - long.start,
        "itl_during_long_prefill": _ms(window),
        "itl_all": _ms(everything),
    }


def format_summary(s: dict) -> str:
    def row(name, d):
        if not d["n"]:
            return f"{name:<26}{d['n']:>6}{'-':>10}{'-':>10}{'-':>10}"
        return f"{name:<26}{d['n']:>6}{d['p50_ms']:>10.1f}{d['p99_ms']:>10.1f}{d['max_ms']:>10.1f}"

    return "\n".join([
        f"{s['streams']} streams from {s['clients']} clients ({s['failed']} failed); long prompt of "
        f"~{s['long_prompt_tokens']} tokens: time to first token {s['long_ttft_s']:.2f} s",
        f"{'ITL of the other streams':<26}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}",
        row("while it prefilled", s["itl_during_long_prefill"]),
        row("whole run", s["itl_all"]),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefill_stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4, help="streams running when the long prompt arrives")
    p.add_argument("--long-prompt-tokens", type=int, default=1500)
    p.add_argument("--long-after", type=float, default=2.0, help="seconds before the long prompt is sent")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per background request")
    p.add_argument("--duration", type=float, default=8.0, help="seconds during which background requests start")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--json", help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    if args.clients < 1 or args.long_prompt_tokens < 1:
        sys.exit("bench.prefill_stall: --clients and --long-prompt-tokens must be at least 1")
    try:
        summary = asyncio.run(run(args.url, args.clients, args.long_prompt_tokens, args.long_after,
                                  args.max_tokens, args.duration, load_prompt_texts(args.prompts)))
    except (httpx.HTTPError, RuntimeError) as exc:
        sys.exit(f"bench.prefill_stall: {exc}")
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.json}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
