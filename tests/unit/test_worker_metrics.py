"""The worker-side series: HistogramCounts (kept by a worker, sent whole in
WorkerStats) and how WorkerCollector renders reports, parsed by prometheus-client."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from protocol.codec import decode, encode
from protocol.messages import HistogramCounts, WorkerStats
from server.metrics import buckets_1_2_5
from server.worker_metrics import WorkerCollector


def test_histogram_counts_bucket_by_upper_bound():
    """Catches an off-by-one at a bound (Prometheus buckets are `le`) and a lost +Inf bucket."""
    h = HistogramCounts([1, 8, 16])
    for value in (1, 2, 8, 9, 100):
        h.observe(value)
    assert h.counts == [1, 2, 1, 1] and h.sum == 120
    assert decode(encode(WorkerStats("verify", 1.0, 2.0, iteration_tokens=h))).message.iteration_tokens == h


def test_buckets_1_2_5_as_vllm():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(512)[-1] == 500


def scrape(worker_stats: dict) -> dict:
    registry = CollectorRegistry()
    backend = SimpleNamespace(worker_stats=worker_stats, restarts={"draft": 1})
    registry.register(WorkerCollector(backend, "m"))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_collector_renders_reports_with_the_model_name():
    """Catches: a series without model_name, a non-cumulative bucket, the KV gauge not
    wired to the verify report, a malformed histogram breaking the scrape."""
    h = HistogramCounts([1, 8])
    for value in (1, 5, 5, 30):
        h.observe(value)
    samples = scrape({"verify": WorkerStats("verify", 1.0, 4.0, kv_cache_usage=0.25, iteration_tokens=h)})
    assert all(dict(labels).get("model_name") == "m" for _, labels in samples)
    m = (("model_name", "m"),)
    assert samples[("tandem:kv_cache_usage_perc", m)] == 0.25
    assert [samples[("tandem:iteration_tokens_total_bucket", (("le", le),) + m)] for le in ("1.0", "8.0", "+Inf")] \
        == [1, 3, 4]
    assert samples[("tandem:iteration_tokens_total_sum", m)] == 41
    assert samples[("tandem:worker_busy_fraction", m + (("role", "verify"),))] == 0.25
    assert samples[("tandem:worker_restarts_total", m + (("role", "draft"),))] == 1


def test_prefix_cache_counters_per_role():
    """vLLM's prefix_cache_queries / _hits (tokens) with a role label, from each worker's report.
    Catches: the fields not wired, one role's counts shown under the other's label."""
    samples = scrape({
        "verify": WorkerStats("verify", 1.0, 4.0, prefix_cache_queries=100, prefix_cache_hits=64),
        "draft": WorkerStats("draft", 1.0, 4.0, prefix_cache_queries=100, prefix_cache_hits=32),
    })
    m = (("model_name", "m"),)
    assert samples[("tandem:prefix_cache_queries_total", m + (("role", "verify"),))] == 100
    assert samples[("tandem:prefix_cache_hits_total", m + (("role", "verify"),))] == 64
    assert samples[("tandem:prefix_cache_hits_total", m + (("role", "draft"),))] == 32

    broken = HistogramCounts([1, 8], counts=[1, 2])  # one count short: dropped, the rest still served
    samples = scrape({"verify": WorkerStats("verify", 1.0, 4.0, iteration_tokens=broken)})
    assert ("tandem:iteration_tokens_total_count", m) not in samples
    assert samples[("tandem:kv_cache_usage_perc", m)] == 0
