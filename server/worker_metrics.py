"""Worker-side series, read at scrape time from what the workers report
(WorkerStats every ~0.5 s) and from the launcher's restart counts. Every
series carries the model_name label, as the server's own (server/metrics.py)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from protocol.messages import HistogramCounts, WorkerStats
from server.backend import Backend

PREFIX = "tandem:"
MODEL_LABEL = "model_name"


EASYSPEC_HELP = {
    "fuzzy_passes": "Layer-parallel (fuzzy) draft passes.",
    "fuzzy_tokens": "Tokens through fuzzy draft passes.",
    "fuzzy_s": "Time in fuzzy draft passes.",
    "exact_passes": "Exact (layer-by-layer) draft passes: prompts and calibrations.",
    "exact_tokens": "Tokens through exact draft passes.",
    "exact_s": "Time in exact draft passes.",
    "calibrations": "Exact passes that replaced fuzzy KV entries.",
    "calibrated_tokens": "Tokens whose fuzzy KV was recomputed exactly.",
    "calibration_s": "Time in calibration passes.",
    "exchange_count": "Hidden-state exchanges between the draft's ranks.",
    "exchange_s": "Time in hidden-state exchanges.",
}


# (role, WorkerStats field, series, help): a worker's cumulative counters, 0 before its first report
COUNTERS = (
    ("draft", "rollbacks", "spec_decode_rollbacks",
     "Times the draft cropped its cache because the verifier parted from its drafts."),
    ("draft", "draft_tokens", "spec_decode_drafted_tokens", "Tokens the draft drafted (verified or not)."),
    ("verify", "draft_wait_s", "verify_draft_wait_seconds",
     "Time the verifier sat idle waiting for draft tokens (AMUSD: the draft is the bottleneck)."),
    ("verify", "stale_drafts", "spec_decode_stale_draft_tokens",
     "Draft tokens dropped by the verifier because they were drafted from an old prefix."),
    ("verify", "wide_steps", "verify_wide_steps",
     "Verify steps whose target pass also ran on the idle draft's cores (placement borrow_draft_cores)."),
)
# (WorkerStats field, series, help): cumulative counters of every worker, with its role label
ROLE_COUNTERS = (
    ("prefix_cache_queries", "prefix_cache_queries",
     "Prompt tokens to prefill, of requests that may reuse a cached prefix (vLLM's prefix_cache_queries)."),
    ("prefix_cache_hits", "prefix_cache_hits",
     "Of those prompt tokens, the ones whose KV was reused from the prefix cache (vLLM's prefix_cache_hits)."),
)
# (role, WorkerStats field, series, help): a worker's latest value, 0 before its first report
GAUGES = (
    ("verify", "kv_cache_usage", "kv_cache_usage_perc",
     "KV-cache usage: token slots the running requests hold over the slots of all caches. 1 means 100 percent."),
    ("verify", "kv_cache_usage", "gpu_cache_usage_perc",
     "KV-cache usage (on any device). DEPRECATED, as in vLLM: use kv_cache_usage_perc (vLLM's dashboard charts this)."),
)
# (role, WorkerStats field, series, help): a worker's HistogramCounts, no samples before its first report
HISTOGRAMS = (
    ("verify", "iteration_tokens", "iteration_tokens_total",
     "Tokens per engine step of the verify worker: prompt tokens it prefilled plus tokens it emitted."),
)


def histogram_buckets(counts: HistogramCounts) -> list[tuple[str, float]] | None:
    """Cumulative (le, count) pairs ending in +Inf, or None for a malformed report."""
    if len(counts.counts) != len(counts.bounds) + 1:
        return None
    out, total = [], 0
    for bound, count in zip([*counts.bounds, float("inf")], counts.counts):
        total += count
        out.append((floatToGoString(bound), total))
    return out


class WorkerCollector(Collector):
    def __init__(self, backend: Backend, model_name: str):
        self.backend = backend
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats: dict[str, WorkerStats] = dict(self.backend.worker_stats)
        model = self.model_name
        labels = [MODEL_LABEL, "role"]
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Worker processes restarted after dying.",
                                       labels=labels)
        for role, count in sorted(self.backend.restarts.items()):
            restarts.add_metric([model, role], count)
        yield restarts

        busy = CounterMetricFamily(PREFIX + "worker_busy_seconds", "Time a worker spent computing.", labels=labels)
        fraction = GaugeMetricFamily(
            PREFIX + "worker_busy_fraction",
            "Busy time over wall time since the worker started: do draft and verify overlap?",
            labels=labels,
        )
        for role, report in sorted(stats.items()):
            busy.add_metric([model, role], report.busy_s)
            fraction.add_metric([model, role], report.busy_s / report.wall_s if report.wall_s > 0 else 0.0)
        yield busy
        yield fraction

        for field, name, help_text in ROLE_COUNTERS:
            metric = CounterMetricFamily(PREFIX + name, help_text, labels=labels)
            for role, report in sorted(stats.items()):
                metric.add_metric([model, role], getattr(report, field))
            yield metric
        for table, family in ((COUNTERS, CounterMetricFamily), (GAUGES, GaugeMetricFamily)):
            for role, field, name, help_text in table:
                report = stats.get(role)
                metric = family(PREFIX + name, help_text, labels=[MODEL_LABEL])
                metric.add_metric([model], getattr(report, field) if report else 0)
                yield metric
        for role, field, name, help_text in HISTOGRAMS:
            metric = HistogramMetricFamily(PREFIX + name, help_text, labels=[MODEL_LABEL])
            counts = getattr(stats.get(role), field, None)
            buckets = histogram_buckets(counts) if counts is not None else None
            if buckets is not None:
                metric.add_metric([model], buckets, sum_value=counts.sum)
            yield metric
        batch = HistogramMetricFamily(PREFIX + "batch_size", "Requests in one model pass (continuous batching): "
                                      "role verify, target passes; role draft, draft passes.", labels=labels)
        for role, report in sorted(stats.items()):
            buckets = histogram_buckets(report.batch_sizes) if report.batch_sizes is not None else None
            if buckets is not None:
                batch.add_metric([model, role], buckets, sum_value=report.batch_sizes.sum)
        yield batch
        # EasySpec draft: fuzzy (layer-parallel) vs exact passes, calibration, hidden-state exchange
        draft = stats.get("draft")
        for key, value in sorted(((draft.easyspec or {}) if draft else {}).items()):
            name = key[:-2] + "_seconds" if key.endswith("_s") else key
            metric = CounterMetricFamily(PREFIX + "easyspec_" + name, EASYSPEC_HELP.get(key, key), labels=[MODEL_LABEL])
            metric.add_metric([model], value)
            yield metric
