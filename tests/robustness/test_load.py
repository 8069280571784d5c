"""32 concurrent clients against a real launched server (tiny model, verify +
draft workers), through bench/load.py: a mix of streaming and not,
completions and chat, greedy and seeded sampling. Every request completes;
every output equals that request served alone (no cross-talk between
requests); /health answers within 1 s throughout; and the memory (VmRSS) of
the server and of each worker after a second round is within RSS_GROWTH of
the first round's. The shared server runs `sd`; the other modes get one round
each on a server of their own."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from bench.load import Plan, format_table, load_prompt_texts, plan_requests, run_load, summarize
from tests.helpers import TINY_EASYSPEC_SECTIONS, launch_server, metric_samples, wait_until
from tests.robustness.support import process_rss, tiny_server_config

CLIENTS = 32
REQUESTS = 64  # per round: two per client
MAX_TOKENS = 12
SAMPLING_FRACTION = 0.25  # sampled rounds ship the draft's distributions: the slow kind on a tiny model
RSS_GROWTH = 0.15  # allowed growth of each process's RSS from round 1 to round 2
HEALTH_LIMIT_S = 1.0


class HealthProbe:
    """Polls /health in the background; keeps every latency and status."""

    def __init__(self, url: str, every_s: float = 0.1):
        self.url, self.every_s = url, every_s
        self.latencies: list[float] = []
        self.statuses: list[int | str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    self.statuses.append(client.get(f"{self.url}/health").status_code)
                except httpx.HTTPError as exc:
                    self.statuses.append(type(exc).__name__)
                self.latencies.append(time.perf_counter() - start)
                self._stop.wait(self.every_s)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def solo_key(plan: Plan) -> tuple:
    return plan.prompt, plan.chat, plan.seed, plan.max_tokens


def load_round(url: str, plans: list[Plan], solo: dict[tuple, str], roles=("verify",)) -> dict:
    with HealthProbe(url) as probe:
        results, elapsed = asyncio.run(run_load(url, plans, clients=CLIENTS))
    summary = summarize(results, elapsed, CLIENTS)
    print(format_table(summary))
    print(f"/health during load: {len(probe.latencies)} probes, max {max(probe.latencies) * 1000:.0f} ms")
    assert summary["failed"] == 0, summary["errors_by_status"]
    for r in results:
        assert r.finish_reason in ("stop", "length"), r
        assert r.text == solo[solo_key(r.plan)], (r.plan, r.text, solo[solo_key(r.plan)])
    assert set(probe.statuses) == {200}, probe.statuses
    assert max(probe.latencies) < HEALTH_LIMIT_S
    assert_passes_were_batched(url, roles)
    return summary


def assert_passes_were_batched(url: str, roles=("verify",)) -> None:
    """The passes of each worker in roles held several requests (continuous batching), as
    its histogram on /metrics shows: passes of one request are not all of them (how many
    more depends on timing, so no mean is asserted); the KV cache usage gauge is a fraction."""
    def batched_passes(role: str) -> float:
        m = metric_samples(url)
        total = m[("tandem:batch_size_count", (("role", role),))]
        single = m[("tandem:batch_size_bucket", (("le", "1.0"), ("role", role)))]  # passes of 1 request
        return total - single

    for role in roles:
        assert wait_until(lambda: batched_passes(role) > 0, timeout_s=5, interval_s=0.2), (role, metric_samples(url))
    samples = metric_samples(url)
    assert samples[("tandem:iteration_tokens_total_count", ())] > 0
    assert 0.0 <= samples[("tandem:kv_cache_usage_perc", ())] <= 1.0


def easyspec_counts(url: str) -> dict[str, float]:
    time.sleep(1.2)  # the draft reports its counters every ~0.5 s: let it report what it has done
    m = metric_samples(url)
    return {k: m[(f"tandem:easyspec_{k}_total", ())] for k in ("exchange_count", "fuzzy_passes", "exact_passes")}


def assert_draft_ranks_were_batched(before: dict, after: dict) -> None:
    """Under load the EasySpec draft's ranks ran several requests per collective pass: one
    pass per request would cost every exact pass a command and a logits gather, and every
    fuzzy pass a command, an all-reduce (the tiny draft's one parallel group) and a gather,
    so markedly fewer exchanges mean requests shared them (a draft that hands its ranks one
    request at a time fails this)."""
    exchanges, fuzzy, exact = (after[k] - before[k] for k in ("exchange_count", "fuzzy_passes", "exact_passes"))
    assert fuzzy > 0 and 0 < exchanges < 0.8 * (2 * exact + 3 * fuzzy), (exchanges, exact, fuzzy)


def mixed_plans() -> list[Plan]:
    plans = plan_requests(load_prompt_texts(), REQUESTS, stream_fraction=0.5, chat_fraction=0.5,
                          sampling_fraction=SAMPLING_FRACTION, max_tokens=MAX_TOKENS, mix_seed=5)
    kinds = {(p.stream, p.chat, p.sampled) for p in plans}
    assert len(kinds) == 8  # every combination of streaming / chat / sampled is in the mix
    return plans


def solo_outputs(url: str, plans: list[Plan]) -> dict[tuple, str]:
    """Each distinct request served alone, one at a time."""
    unique = list({solo_key(p): p for p in plans}.values())
    solo_results, _ = asyncio.run(run_load(url, unique, clients=1))
    assert all(r.ok for r in solo_results), [r.error for r in solo_results if not r.ok]
    return {solo_key(r.plan): r.text for r in solo_results}


def idle(server) -> bool:
    return server.metric("tandem:num_requests_running") == 0


def test_32_clients_lose_nothing_and_memory_stays_flat(robust_server):
    url = robust_server.url
    plans = mixed_plans()
    solo = solo_outputs(url, plans)

    pids = robust_server.worker_pids()
    rss = {"start": process_rss(robust_server)}
    load_round(url, plans, solo)
    rss["after round 1"] = process_rss(robust_server)
    load_round(url, plans, solo)
    rss["after round 2"] = process_rss(robust_server)

    print("RSS (MiB): " + "; ".join(
        f"{stage}: " + ", ".join(f"{proc} {kib / 1024:.0f}" for proc, kib in values.items())
        for stage, values in rss.items()))
    first, second = rss["after round 1"], rss["after round 2"]
    assert set(first) == set(second) == {"server", "verify", "draft"}
    assert robust_server.worker_pids() == pids  # no worker died or was replaced
    for proc in first:
        assert second[proc] <= first[proc] * (1 + RSS_GROWTH), (proc, first[proc], second[proc])
    assert wait_until(lambda: idle(robust_server), timeout_s=10, interval_s=0.05)  # the gauge follows the last output


@pytest.mark.parametrize("mode", ["ar", "amusd", "easyspec", "lookup"])
def test_32_clients_lose_nothing_in_every_mode(tmp_path, tiny_target_dir, mode):
    sections = TINY_EASYSPEC_SECTIONS if mode == "easyspec" else {}
    config = tiny_server_config(tmp_path / "tiny.yaml", tiny_target_dir, **sections)
    with launch_server(config, mode=mode) as server:
        plans = mixed_plans()
        pids = server.worker_pids()
        solo = solo_outputs(server.url, plans)
        before = easyspec_counts(server.url) if mode == "easyspec" else None
        # easyspec: the layer-parallel draft's passes (over its 2 ranks) hold several requests too
        load_round(server.url, plans, solo, ("verify", "draft") if before else ("verify",))
        if before:
            assert_draft_ranks_were_batched(before, easyspec_counts(server.url))
        assert server.worker_pids() == pids
        assert wait_until(lambda: idle(server), timeout_s=10, interval_s=0.05)
