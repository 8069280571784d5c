"""Prometheus metrics with vLLM's names under the `tandem:` prefix, each
labelled `model_name` (the served model name) as vLLM labels them, so vLLM's
dashboards work once the prefix is changed. Each app owns its registry (no
global state): `Metrics` declares every series in one place (adding one is one
line), a `PromptTracker` per prompt and a `RequestTracker` per backend request
(one per choice) turn outputs into observations.

Units, as in vLLM: a *prompt* is one prompt of an HTTP request with its n
choices (a completions request with a list of prompts has several); a *backend
request* is one choice. Prompt tokens count once per prompt (as in `usage`).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protocol.messages import TokenOutput
from server.worker_metrics import MODEL_LABEL, PREFIX, WorkerCollector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
RUN_AHEAD_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                   40.0, 50.0, 60.0, 120.0, 240.0, 480.0)
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's request_params_n
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # vLLM's time_per_output_token_seconds


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class _ModelLabelled:
    """A labelled metric with model_name already filled in: .labels(**others)."""

    def __init__(self, metric: Counter | Histogram, model_name: str):
        self._metric, self._model_name = metric, model_name

    def labels(self, **labels: str):
        return self._metric.labels(**{MODEL_LABEL: self._model_name}, **labels)


class Metrics:
    """Every series the server exports. `backend` provides `.stats`
    (num_running, num_waiting), read at scrape time."""

    def __init__(self, registry: CollectorRegistry, backend: Any, model_name: str, max_model_len: int):
        self.registry = registry

        def labelled(cls, name: str, doc: str, labels: tuple[str, ...] = (), **kwargs):
            metric = cls(PREFIX + name, doc, (MODEL_LABEL, *labels), registry=registry, **kwargs)
            return _ModelLabelled(metric, model_name) if labels else metric.labels(model_name)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()):
            return labelled(Counter, name, doc, labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]):
            return labelled(Histogram, name, doc, buckets=buckets)

        def gauge(name: str, doc: str):
            return labelled(Gauge, name, doc)

        tokens = buckets_1_2_5(max_model_len)
        self.num_drafts = counter("spec_decode_num_drafts", "Target passes that verified at least one draft token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified by the target.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by draft position.", ("position",)
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens submitted (once per prompt, as in usage).")
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
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first: the "
                              "same observations as inter_token_latency_seconds, in vLLM's buckets (its "
                              "dashboard charts this name).", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Backend request latency, submit to finish.",
                             REQUEST_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds", "Time a request waited in the backend's "
                                    "queue (WAITING).", REQUEST_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time from leaving the queue to the "
                                      "first token (PREFILL).", REQUEST_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time from the first token to the last "
                                     "(DECODE).", REQUEST_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "Time from leaving the queue to the "
                                        "last token (RUNNING: prefill + decode).", REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of a finished prompt.",
                                               tokens)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated for a finished prompt (all its choices).", tokens
        )
        self.max_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Tokens generated by the longest choice of a finished prompt.",
            tokens
        )
        self.params_n = histogram("request_params_n", "The n request parameter, per finished prompt.", N_BUCKETS)
        self.params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens request parameter (the context's rest when not given), "
            "per finished prompt.", tokens
        )

        self.run_ahead = histogram("spec_decode_draft_run_ahead", "Draft tokens that had arrived when a "
                                   "verification started (how far ahead the draft was).", RUN_AHEAD_BUCKETS)
        self.round_drafts = histogram("spec_decode_round_draft_tokens", "Drafts each target pass verified for a "
                                      "request, 0 included (speculation.adaptive and a request's own cap "
                                      "choose fewer under load).", RUN_AHEAD_BUCKETS)
        registry.register(WorkerCollector(backend, model_name))

        self.running.set_function(lambda: backend.stats.num_running)
        self.waiting.set_function(lambda: backend.stats.num_waiting)

    def track_prompt(self, num_prompt_tokens: int, n: int, max_tokens: int) -> "PromptTracker":
        """Start following one prompt and its n choices (call when it is submitted)."""
        self.prompt_tokens.inc(num_prompt_tokens)
        return PromptTracker(self, num_prompt_tokens, n, max_tokens)

    def record_failure(self, reason: str) -> None:
        self.request_failure.labels(reason=reason).inc()


class PromptTracker:
    """One prompt's n choices: its per-prompt histograms once all of them finished."""

    def __init__(self, metrics: Metrics, num_prompt_tokens: int, n: int, max_tokens: int):
        self._m = metrics
        self._num_prompt_tokens, self._n, self._max_tokens = num_prompt_tokens, n, max_tokens
        self._finished = 0
        self._generated = 0
        self._longest = 0

    def choice(self) -> "RequestTracker":
        """Follow one more choice (a backend request) of this prompt."""
        return RequestTracker(self._m, self)

    def choice_finished(self, num_tokens: int) -> None:
        self._finished += 1
        self._generated += num_tokens
        self._longest = max(self._longest, num_tokens)
        if self._finished == self._n:
            m = self._m
            m.request_prompt_tokens.observe(self._num_prompt_tokens)
            m.request_generation_tokens.observe(self._generated)
            m.max_generation_tokens.observe(self._longest)
            m.params_n.observe(self._n)
            m.params_max_tokens.observe(self._max_tokens)


class RequestTracker:
    """Timing and speculation counters of one backend request."""

    def __init__(self, metrics: Metrics, prompt: PromptTracker):
        self._m = metrics
        self._prompt = prompt
        self._start = self._last = time.monotonic()
        self._first: float | None = None
        self._queue_s = 0.0
        self._num_tokens = 0

    def on_output(self, output: TokenOutput, num_tokens: int) -> None:
        """One TokenOutput (a target pass) of which `num_tokens` reach the client."""
        m, now = self._m, time.monotonic()
        if self._first is None:
            self._first = now
            m.ttft.observe(now - self._start)
            if output.queue_time_s is not None:
                self._queue_s = output.queue_time_s
                m.queue_time.observe(output.queue_time_s)
        elif num_tokens > 0:
            step = (now - self._last) / num_tokens
            for _ in range(num_tokens):
                m.itl.observe(step)
                m.tpot.observe(step)
        self._last = now
        self._num_tokens += num_tokens
        m.generation_tokens.inc(num_tokens)
        if output.token_ids:  # a round (not a prompt-only scoring)
            m.round_drafts.observe(output.num_draft_tokens)
        if output.num_draft_tokens > 0:
            m.run_ahead.observe(output.run_ahead)
            m.num_drafts.inc()
            m.num_draft_tokens.inc(output.num_draft_tokens)
            m.num_accepted_tokens.inc(output.num_accepted_tokens)
            for position in range(output.num_accepted_tokens):
                m.accepted_per_pos.labels(position=str(position)).inc()

    def on_finish(self, finish_reason: str) -> None:
        """After the last on_output: the request's phase times, as vLLM splits them."""
        m, now = self._m, time.monotonic()
        first = self._first if self._first is not None else now
        scheduled = min(self._start + self._queue_s, first)  # the worker's queue time, within submit..first
        m.e2e.observe(now - self._start)
        m.prefill_time.observe(first - scheduled)
        m.decode_time.observe(now - first)
        m.inference_time.observe(now - scheduled)
        m.request_success.labels(finished_reason=finish_reason).inc()
        self._prompt.choice_finished(self._num_tokens)
