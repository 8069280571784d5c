"""Prefix caching under load, on a real launched server (tiny model, float32, verify + draft
workers, `sd`): chat requests with one long system prompt, some with n > 1 choices, greedy
and seeded sampling, sent by concurrent OpenAI SDK clients. The verify and draft workers
report prefix-cache hits on /metrics, and every choice equals what a server without prefix
caching answers that request alone."""

from __future__ import annotations

import asyncio

import openai

from tests.helpers import launch_server, metric_samples, wait_until
from tests.robustness.support import tiny_server_config

CLIENTS = 8
MAX_TOKENS = 8
SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, name the "
          "port and the day, and never invent a tracking number. ") * 3
QUESTIONS = ["Where is my parcel?", "When does the ferry leave?", "Is the harbour open on Sunday?",
             "How heavy may a crate be?", "Can I ship a bicycle?", "What does customs need?"]


def plans() -> list[dict]:
    """(question, n, seed) for each request: n 2 for every third one, sampled for every other one."""
    return [
        {"question": q, "n": 2 if i % 3 == 0 else 1, "seed": 100 + i if i % 2 else None}
        for i, q in enumerate(QUESTIONS * 2)
    ]


async def _ask(sdk: openai.AsyncOpenAI, plan: dict) -> list[str]:
    sampled = plan["seed"] is not None
    reply = await sdk.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": plan["question"]}],
        max_tokens=MAX_TOKENS,
        n=plan["n"],
        temperature=0.8 if sampled else 0,
        seed=plan["seed"],
    )
    return [choice.message.content for choice in sorted(reply.choices, key=lambda c: c.index)]


def answers(url: str, requests: list[dict], clients: int) -> list[list[str]]:
    async def go():
        limit = asyncio.Semaphore(clients)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:

            async def one(plan):
                async with limit:
                    return await _ask(sdk, plan)

            return await asyncio.gather(*(one(p) for p in requests))

    return asyncio.run(go())


def test_shared_system_prompt_under_load_hits_and_equals_cold_solo_runs(tmp_path, tiny_target_dir):
    config = tiny_server_config(tmp_path / "tiny.yaml", tiny_target_dir, scheduler={"prefill_chunk_tokens": 16})
    requests = plans()
    with launch_server(config, "--set", "scheduler.prefix_caching=false") as cold:
        solo = answers(cold.url, requests, clients=1)
        samples = metric_samples(cold.url)
        assert samples.get(("tandem:prefix_cache_hits_total", (("role", "verify"),)), 0) == 0
    with launch_server(config) as server:
        got = answers(server.url, requests, clients=CLIENTS)
        # the workers report every 0.5 s: wait for reports after the last request
        assert wait_until(lambda: settled(counts(server.url)), timeout_s=10, interval_s=0.3), counts(server.url)
        final = counts(server.url)
    assert got == solo
    for role in ("verify", "draft"):
        hits, queries = final[role]
        assert 0 < hits < queries, (role, hits, queries)


def counts(url: str) -> dict[str, tuple[float, float]]:
    """role -> (prefix-cache hits, queries) as /metrics shows them (0 before a report)."""
    samples = metric_samples(url)

    def value(name: str, role: str) -> float:
        return samples.get((f"tandem:prefix_cache_{name}_total", (("role", role),)), 0)

    return {role: (value("hits", role), value("queries", role)) for role in ("verify", "draft")}


def settled(final: dict[str, tuple[float, float]]) -> bool:
    """Both workers counted every request: the same prompt tokens queried by each."""
    return final["verify"][1] > 0 and final["verify"][1] == final["draft"][1]
