"""GET /health, /v1/models and /metrics (backend-agnostic)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import assert_error, metric, scrape

COUNTERS = [
    "tandem:spec_decode_num_drafts", "tandem:spec_decode_num_draft_tokens",
    "tandem:spec_decode_num_accepted_tokens", "tandem:spec_decode_num_accepted_tokens_per_pos",
    "tandem:prompt_tokens", "tandem:generation_tokens", "tandem:request_success", "tandem:request_failure",
]
GAUGES = ["tandem:num_requests_running", "tandem:num_requests_waiting"]
HISTOGRAMS = [
    "tandem:time_to_first_token_seconds", "tandem:inter_token_latency_seconds",
    "tandem:e2e_request_latency_seconds", "tandem:request_queue_time_seconds",
]


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_models(http, client, model_name):
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["object"] == "model" and card["id"] == model_name and isinstance(card["created"], int)
    assert card["max_model_len"] > 0
    assert [m.id for m in client.models.list()] == [model_name]


def test_metric_families_exist(http):
    families = {f.name: f.type for f in text_string_to_metric_families(scrape(http))}
    for name in COUNTERS:
        assert families.get(name) == "counter", name
    for name in GAUGES:
        assert families.get(name) == "gauge", name
    for name in HISTOGRAMS:
        assert families.get(name) == "histogram", name


def test_counters_move_after_requests(http, client, model_name):
    before = scrape(http)
    r = client.completions.create(model=model_name, prompt=[100, 101, 102], max_tokens=6, temperature=0)
    assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": "x", "bogus": 1}), 400)
    after = scrape(http)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("tandem:prompt_tokens_total") == 3
    assert delta("tandem:generation_tokens_total") == r.usage.completion_tokens
    assert delta("tandem:request_success_total", finished_reason=r.choices[0].finish_reason) == 1
    assert delta("tandem:request_failure_total", reason="invalid_request") == 1
    assert delta("tandem:time_to_first_token_seconds_count") == 1
    assert delta("tandem:e2e_request_latency_seconds_count") == 1
    spec = r.model_extra["speculation"]
    assert delta("tandem:spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert delta("tandem:spec_decode_num_accepted_tokens_total") == spec["num_accepted_tokens"]
    assert delta("tandem:spec_decode_num_accepted_tokens_per_pos_total") == spec["num_accepted_tokens"]
    assert delta("tandem:spec_decode_num_drafts_total") <= spec["num_target_passes"]
    # Every token after the first pass observes one inter-token latency.
    assert 0 <= delta("tandem:inter_token_latency_seconds_count") < r.usage.completion_tokens
