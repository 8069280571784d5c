"""``python -m bench.load``: many concurrent clients against any running
OpenAI-compatible server (Tandem or not).

    python -m bench.load --url http://127.0.0.1:8000 --clients 32 --requests 128 \\
        [--stream-fraction 0.5] [--chat-fraction 0.5] [--sampling-fraction 0.5] \\
        [--max-tokens 64] [--model NAME] [--api-key KEY] [--json out.json]

Each of `--clients` workers takes the next request from a shared list of
`--requests` until none is left. The list is a deterministic mix (`--mix-seed`):
exactly the given fractions are streaming, chat and sampled (temperature 1,
top_p 0.95, a per-request seed; the rest greedy), prompts taken in turn from
bench/prompts.jsonl (or `--prompts`).

Reported: requests/s and generated tokens/s over the whole run; time to first
token (TTFT), inter-token latency (ITL: the gap between two streamed chunks
that carry text) and time per output token (TPOT: (end - first token) /
(tokens - 1)) from the streaming requests; end-to-end latency from all; error
counts by HTTP status ("connection" when no status came back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


@dataclass(frozen=True)
class Plan:
    """One request of the run."""

    index: int
    prompt: str
    chat: bool
    stream: bool
    seed: int | None  # None: greedy (temperature 0); else sampled with this seed
    max_tokens: int
    num_draft_tokens: int | None = None  # the request's own speculation cap (None: the server's)

    @property
    def sampled(self) -> bool:
        return self.seed is not None

    def body(self, model: str) -> dict:
        body: dict = {"model": model, "max_tokens": self.max_tokens}
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        if self.sampled:
            body.update(temperature=1.0, top_p=0.95, seed=self.seed)
        else:
            body["temperature"] = 0.0
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.num_draft_tokens is not None:
            body["speculation"] = {"num_draft_tokens": self.num_draft_tokens}
        return body


@dataclass
class Result:
    plan: Plan
    status: int | None = None  # HTTP status; None: no response (connection error)
    error: str | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    start: float = 0.0
    first_token: float | None = None  # streaming: when the first chunk with text arrived
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # streaming: arrival of each chunk with text

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def error_kind(self) -> str:
        if self.status is None:
            return "connection"
        return str(self.status) if self.status != 200 else "stream_error"


def load_prompt_texts(path: str | Path = DEFAULT_PROMPTS) -> list[str]:
    texts = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["prompt"] if isinstance(row, dict) else str(row))
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts


def _exact_share(n: int, fraction: float, rng: random.Random) -> list[bool]:
    """n flags of which round(n * fraction) are True, in a shuffled order."""
    count = round(n * min(max(fraction, 0.0), 1.0))
    flags = [True] * count + [False] * (n - count)
    rng.shuffle(flags)
    return flags


def plan_requests(prompts: Sequence[str], num_requests: int, *, stream_fraction: float = 0.5,
                  chat_fraction: float = 0.5, sampling_fraction: float = 0.5, max_tokens: int = 64,
                  mix_seed: int = 0, num_draft_tokens: int | None = None) -> list[Plan]:
    rng = random.Random(mix_seed)
    streams = _exact_share(num_requests, stream_fraction, rng)
    chats = _exact_share(num_requests, chat_fraction, rng)
    sampled = _exact_share(num_requests, sampling_fraction, rng)
    return [
        Plan(index=i, prompt=prompts[i % len(prompts)], chat=chats[i], stream=streams[i],
             seed=1000 + i if sampled[i] else None, max_tokens=max_tokens, num_draft_tokens=num_draft_tokens)
        for i in range(num_requests)
    ]


# -- running -------------------------------------------------------------------------


async def _send(client: httpx.AsyncClient, plan: Plan, model: str) -> Result:
    result = Result(plan, start=time.perf_counter())
    path = "/v1/chat/completions" if plan.chat else "/v1/completions"
    try:
        if plan.stream:
            await _send_stream(client, path, plan.body(model), result)
        else:
            response = await client.post(path, json=plan.body(model))
            result.status = response.status_code
            data = response.json()
            if response.status_code != 200:
                result.error = _error_message(data, response.text)
            else:
                choice = data["choices"][0]
                result.text = choice["message"]["content"] if plan.chat else choice["text"]
                result.finish_reason = choice["finish_reason"]
                result.completion_tokens = data["usage"]["completion_tokens"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def _send_stream(client: httpx.AsyncClient, path: str, body: dict, result: Result) -> None:
    chat = result.plan.chat
    async with client.stream("POST", path, json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            raw = await response.aread()
            result.error = _error_message(_json_or_none(raw), raw.decode(errors="replace"))
            return
        pieces = []
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                result.error = _error_message(chunk, payload)
                continue
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    now = time.perf_counter()
                    if result.first_token is None:
                        result.first_token = now
                    result.chunk_times.append(now)
                    pieces.append(text)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        result.text = "".join(pieces)
        if result.error is None and result.finish_reason is None:
            result.error = "the stream ended without a finish_reason"


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(data, fallback: str) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message"))
    return fallback[:200]


async def fetch_model(url: str, api_key: str | None = None) -> str:
    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_load(url: str, plans: Sequence[Plan], *, clients: int, model: str | None = None,
                   api_key: str | None = None, timeout_s: float = 600.0) -> tuple[list[Result], float]:
    """Send every plan through `clients` concurrent workers; (results in plan order, wall seconds)."""
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    model = model or await fetch_model(url, api_key)
    queue: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    results: dict[int, Result] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout_s,
                                 limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                plan = queue.get_nowait()
                results[plan.index] = await _send(client, plan, model)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return [results[p.index] for p in plans], elapsed


# -- the report ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _spread(values: Sequence[float]) -> dict:
    return {"n": len(values), "mean": sum(values) / len(values) if values else None,
            **{f"p{q}": percentile(values, q) for q in (50, 90, 99)}}


def summarize(results: Sequence[Result], elapsed_s: float, clients: int) -> dict:
    ok = [r for r in results if r.ok]
    streamed = [r for r in ok if r.plan.stream and r.first_token is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error_kind] = errors.get(r.error_kind, 0) + 1
    itl = [b - a for r in streamed for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.end - r.first_token) / (r.completion_tokens - 1) for r in streamed if r.completion_tokens > 1]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "clients": clients,
        "requests": len(results),
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_status": dict(sorted(errors.items())),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "duration_s": elapsed_s,
        "requests_per_s": len(ok) / elapsed_s if elapsed_s > 0 else None,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed_s if elapsed_s > 0 else None,
        "ttft_s": _spread([r.first_token - r.start for r in streamed]),
        "itl_s": _spread(itl),
        "tpot_s": _spread(tpot),
        "e2e_s": _spread([r.end - r.start for r in ok]),
    }


def format_table(summary: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value * 1000:.1f}"

    lines = [
        f"requests   {summary['requests']} ({summary['succeeded']} ok, {summary['failed']} failed) "
        f"from {summary['clients']} clients in {summary['duration_s']:.2f} s",
        f"throughput {summary['requests_per_s'] or 0:.2f} req/s, {summary['output_tokens_per_s'] or 0:.1f} "
        f"output tokens/s ({summary['output_tokens']} tokens)",
        f"errors     {summary['errors_by_status'] or 'none'}",
        "",
        f"{'latency (ms)':<14}{'n':>6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("end-to-end", "e2e_s")):
        s = summary[key]
        lines.append(f"{name:<14}{s['n']:>6}{ms(s['mean']):>10}{ms(s['p50']):>10}{ms(s['p90']):>10}{ms(s['p99']):>10}")
    for sample in summary["error_samples"]:
        lines.append(f"error: {sample}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description="Concurrent load against a running server.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server root, with or without /v1")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default: %(default)s)")
    p.add_argument("--requests", type=int, default=128, help="requests in all (default: %(default)s)")
    p.add_argument("--stream-fraction", type=_fraction, default=0.5)
    p.add_argument("--chat-fraction", type=_fraction, default=0.5)
    p.add_argument("--sampling-fraction", type=_fraction, default=0.5, help="seeded sampling; the rest greedy")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-draft-tokens", type=int, metavar="K",
                   help="each request's own speculation cap (the body's speculation.num_draft_tokens; "
                        "0: no drafts; default: the server's)")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: env TANDEM_API_KEY, then OPENAI_API_KEY)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL file with a 'prompt' per line")
    p.add_argument("--mix-seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    p.add_argument("--json", help="also write the summary (and per-request rows) to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        sys.exit("bench.load: --clients, --requests and --max-tokens must be at least 1")
    plans = plan_requests(load_prompt_texts(args.prompts), args.requests, stream_fraction=args.stream_fraction,
                          chat_fraction=args.chat_fraction, sampling_fraction=args.sampling_fraction,
                          max_tokens=args.max_tokens, mix_seed=args.mix_seed,
                          num_draft_tokens=args.num_draft_tokens)
    try:
        results, elapsed = asyncio.run(run_load(args.url, plans, clients=args.clients, model=args.model,
                                                api_key=args.api_key, timeout_s=args.timeout))
    except httpx.HTTPError as exc:
        sys.exit(f"bench.load: cannot reach {args.url}: {exc}")
    summary = summarize(results, elapsed, args.clients)
    print(format_table(summary))
    if args.json:
        rows = [{**asdict(r.plan), "status": r.status, "error": r.error, "completion_tokens": r.completion_tokens,
                 "finish_reason": r.finish_reason, "ttft_s": None if r.first_token is None else r.first_token - r.start,
                 "e2e_s": r.end - r.start} for r in results]
        Path(args.json).write_text(json.dumps({"summary": summary, "requests": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
