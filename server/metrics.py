"""Prometheus metrics with vLLM's names under the `tandem:` prefix, so existing
dashboards work. Each app owns its registry (no global state): `Metrics`
declares every series in one place (adding one is one line), and a
`RequestTracker` per backend request turns its outputs into observations.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protocol.messages import TokenOutput
from server.worker_metrics import WorkerCollector

PREFIX = "tandem:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
RUN_AHEAD_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class Metrics:
    """Every series the server exports. `backend` provides `.stats`
    (num_running, num_waiting), read at scrape time."""

    def __init__(self, registry: CollectorRegistry, backend: Any):
        self.registry = registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, registry=registry)

        self.num_drafts = counter("spec_decode_num_drafts", "Target passes that verified at least one draft token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified by the target.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by draft position.", ("position",)
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens submitted to the workers.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated (returned to clients).")
        self.request_success = counter(
            "request_success", "Backend requests finished (one per choice).", ("finished_reason",)
        )
        self.request_failure = counter(
            "request_failure", "HTTP generation requests that failed, by reason.", ("reason",)
        )
        self.running = gauge("num_requests_running", "Requests the verify worker is running.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting in the verify worker's queue.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens (a multi-token "
                             "pass's interval divided over its tokens).", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Backend request latency, submit to finish.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited in the backend's "
                                    "queue.", REQUEST_BUCKETS)

        self.run_ahead = histogram("spec_decode_draft_run_ahead", "Draft tokens that had arrived when a "
                                   "verification started (how far ahead the draft was).", RUN_AHEAD_BUCKETS)
        registry.register(WorkerCollector(backend))

        self.running.set_function(lambda: backend.stats.num_running)
        self.waiting.set_function(lambda: backend.stats.num_waiting)

    def track(self, num_prompt_tokens: int) -> "RequestTracker":
        """Start following one backend request (call when it is submitted)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self)

    def record_failure(self, reason: str) -> None:
        self.request_failure.labels(reason=reason).inc()


class RequestTracker:
    """Timing and speculation counters of one backend request."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        self._start = self._last = time.monotonic()
        self._seen_output = False

    def on_output(self, output: TokenOutput, num_tokens: int) -> None:
        """One TokenOutput (a target pass) of which `num_tokens` reach the client."""
        m, now = self._m, time.monotonic()
        if not self._seen_output:
            self._seen_output = True
            m.ttft.observe(now - self._start)
            if output.queue_time_s is not None:
                m.queue_time.observe(output.queue_time_s)
        elif num_tokens > 0:
            step = (now - self._last) / num_tokens
            for _ in range(num_tokens):
                m.itl.observe(step)
        self._last = now
        m.generation_tokens.inc(num_tokens)
        if output.num_draft_tokens > 0:
            m.run_ahead.observe(output.run_ahead)
            m.num_drafts.inc()
            m.num_draft_tokens.inc(output.num_draft_tokens)
            m.num_accepted_tokens.inc(output.num_accepted_tokens)
            for position in range(output.num_accepted_tokens):
                m.accepted_per_pos.labels(position=str(position)).inc()

    def on_finish(self, finish_reason: str) -> None:
        self._m.e2e.observe(time.monotonic() - self._start)
        self._m.request_success.labels(finished_reason=finish_reason).inc()
