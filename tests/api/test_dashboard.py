"""observability/grafana/tandem.json queries only series the server exports.

The names come out of every panel's PromQL (and the dashboard's variables) and
are compared with the sample names of a real /metrics scrape (histogram
suffixes included) of a launched tiny server (verify and draft workers) after
it has served a request, failed one and its workers have reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import assert_error, metric
from tests.helpers import wait_until

DASHBOARD = Path(__file__).resolve().parents[2] / "observability" / "grafana" / "tandem.json"
METRIC_NAME = re.compile(r"tandem:[A-Za-z0-9_:]+")
MODEL_SELECTOR = '{model_name="$model_name"}'


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those nested in collapsed rows too."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_queries_name_only_what_the_server_exports(launched_server_url):
    """Catches a dashboard that charts a misspelt series, a counter without _total, a
    histogram without _bucket/_sum/_count, or a series the server stopped exporting."""
    with httpx.Client(base_url=launched_server_url, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        ok = http.post("/v1/completions", json={"model": model, "prompt": "The sea is", "max_tokens": 16,
                                                "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert_error(http.post("/v1/completions", json={"model": model, "prompt": "x", "bogus": 1}), 400)
        assert wait_until(  # the verify worker's next report carries the step histogram
            lambda: metric(http.get("/metrics").text, "tandem:iteration_tokens_total_count") > 0, timeout_s=30
        )
        text = http.get("/metrics").text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    charted = {name for e in exprs for name in METRIC_NAME.findall(e)}
    assert len(charted) >= 25
    assert sorted(charted - exported) == []


# Every series vLLM's own Grafana dashboard (examples/online_serving/prometheus_grafana/grafana.json) queries
VLLM_DASHBOARD = [
    "e2e_request_latency_seconds_bucket", "e2e_request_latency_seconds_sum", "e2e_request_latency_seconds_count",
    "prompt_tokens_total", "generation_tokens_total",
    "time_per_output_token_seconds_bucket", "time_per_output_token_seconds_sum", "time_per_output_token_seconds_count",
    "num_requests_running", "num_requests_waiting",
    "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_sum", "time_to_first_token_seconds_count",
    "gpu_cache_usage_perc", "request_prompt_tokens_bucket", "request_generation_tokens_bucket",
    "request_success_total", "request_queue_time_seconds_sum", "request_prefill_time_seconds_sum",
    "request_decode_time_seconds_sum", "request_max_num_generation_tokens_sum",
]


def test_vllm_dashboard_works_with_the_prefix_changed(launched_server_url):
    """vLLM's dashboard with vllm: replaced by tandem: finds every series it charts
    (its model_name variable reads the label from any of them)."""
    with httpx.Client(base_url=launched_server_url, timeout=60) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        assert http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 4}).status_code == 200
        text = http.get("/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    exported = {s.name for s in samples if s.labels.get("model_name") == model}
    assert sorted({"tandem:" + name for name in VLLM_DASHBOARD} - exported) == []


def test_every_panel_queries_and_selects_the_model():
    """Catches an empty panel and a query that mixes models (no model_name selector)."""
    dashboard = json.loads(DASHBOARD.read_text())
    charts = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(charts) >= 18
    for panel in charts:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = METRIC_NAME.findall(expr)
            assert names, (panel["title"], expr)
            assert expr.count(MODEL_SELECTOR) == len(names), (panel["title"], expr)
