"""Worker-side series, read at scrape time from what the workers report
(WorkerStats every ~0.5 s) and from the launcher's restart counts."""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from protocol.messages import StepHistogram
from server.backend import Backend

PREFIX = "tandem:"


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
)


def _buckets(histogram: StepHistogram) -> list[tuple[str, float]]:
    """Prometheus' cumulative (le, count) pairs of a worker's StepHistogram."""
    total, out = 0, []
    for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts):
        total += count
        out.append(("+Inf" if bound == float("inf") else f"{float(bound):g}", total))
    return out


class WorkerCollector(Collector):
    def __init__(self, backend: Backend):
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        stats = dict(self.backend.worker_stats)
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Worker processes restarted after dying.", labels=["role"])
        for role, count in sorted(self.backend.restarts.items()):
            restarts.add_metric([role], count)
        yield restarts

        busy = CounterMetricFamily(PREFIX + "worker_busy_seconds", "Time a worker spent computing.", labels=["role"])
        fraction = GaugeMetricFamily(
            PREFIX + "worker_busy_fraction",
            "Busy time over wall time since the worker started: do draft and verify overlap?",
            labels=["role"],
        )
        for role, report in sorted(stats.items()):
            busy.add_metric([role], report.busy_s)
            fraction.add_metric([role], report.busy_s / report.wall_s if report.wall_s > 0 else 0.0)
        yield busy
        yield fraction

        for role, field, name, help_text in COUNTERS:
            report = stats.get(role)
            yield CounterMetricFamily(PREFIX + name, help_text, value=getattr(report, field) if report else 0)
        batch = HistogramMetricFamily(
            PREFIX + "batch_size", "Requests in one model pass (continuous batching).", labels=["role"]
        )
        tokens = HistogramMetricFamily(PREFIX + "iteration_tokens_total", "Tokens in one target pass.")
        for role, report in sorted(stats.items()):
            if report.batch_sizes is not None:
                batch.add_metric([role], _buckets(report.batch_sizes), report.batch_sizes.sum)
            if role == "verify" and report.step_tokens is not None:
                tokens.add_metric([], _buckets(report.step_tokens), report.step_tokens.sum)
        yield batch
        yield tokens
        verify = stats.get("verify")
        usage = verify.kv_cache_usage if verify is not None else None
        yield GaugeMetricFamily(
            PREFIX + "kv_cache_usage_perc",
            "Fraction of the target's KV cache positions in use (1 = full), as vLLM reports it.",
            value=usage or 0.0,
        )
        # EasySpec draft: fuzzy (layer-parallel) vs exact passes, calibration, hidden-state exchange
        draft = stats.get("draft")
        for key, value in sorted(((draft.easyspec or {}) if draft else {}).items()):
            name = key[:-2] + "_seconds" if key.endswith("_s") else key
            yield CounterMetricFamily(PREFIX + "easyspec_" + name, EASYSPEC_HELP.get(key, key), value=value)
