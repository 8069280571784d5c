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
    "tandem:request_prefill_time_seconds", "tandem:request_decode_time_seconds",
    "tandem:request_inference_time_seconds", "tandem:request_prompt_tokens", "tandem:request_generation_tokens",
    "tandem:request_params_n", "tandem:request_params_max_tokens", "tandem:iteration_tokens_total",
    "tandem:time_per_output_token_seconds", "tandem:request_max_num_generation_tokens",
    "tandem:spec_decode_round_draft_tokens",
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
    assert delta("tandem:spec_decode_round_draft_tokens_count") == spec["num_target_passes"]
    assert delta("tandem:spec_decode_round_draft_tokens_sum") == spec["num_draft_tokens"]
    # Every token after the first pass observes one inter-token latency.
    assert 0 <= delta("tandem:inter_token_latency_seconds_count") < r.usage.completion_tokens


def test_every_series_carries_the_model_name(http, client, model_name):
    """vLLM's dashboards select on model_name: a series without it (or with another
    name) would be invisible there."""
    client.completions.create(model=model_name, prompt="Hello", max_tokens=2)
    samples = [s for f in text_string_to_metric_families(scrape(http)) for s in f.samples]
    assert len({s.name for s in samples}) > 20
    assert [s for s in samples if s.labels.get("model_name") != model_name] == []


def test_prompt_tokens_count_once_per_prompt(http, client, model_name):
    """Two prompts x n=3: prompt tokens count once per prompt, as in usage (they
    used to count once per choice); the per-prompt histograms observe once per prompt,
    the per-choice ones once per choice."""
    before = scrape(http)
    r = client.completions.create(model=model_name, prompt=[[100, 101, 102], [7, 8, 9, 10, 11]], n=3,
                                  max_tokens=5, temperature=1.0, seed=1)
    after = scrape(http)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert r.usage.prompt_tokens == 8
    assert delta("tandem:prompt_tokens_total") == 8
    assert delta("tandem:request_prompt_tokens_count") == 2 and delta("tandem:request_prompt_tokens_sum") == 8
    assert delta("tandem:request_generation_tokens_sum") == r.usage.completion_tokens == delta(
        "tandem:generation_tokens_total")
    assert delta("tandem:request_max_num_generation_tokens_count") == 2
    assert delta("tandem:request_max_num_generation_tokens_sum") <= 10  # the longest choice of each prompt
    assert delta("tandem:request_params_n_count") == 2 and delta("tandem:request_params_n_sum") == 6
    assert delta("tandem:request_params_max_tokens_sum") == 10
    assert delta("tandem:request_params_max_tokens_bucket", le="5.0") == 2
    assert delta("tandem:request_params_max_tokens_bucket", le="2.0") == 0
    for phase in ("prefill", "decode", "inference"):
        assert delta(f"tandem:request_{phase}_time_seconds_count") == 6


def test_request_phases_add_up(http, client, model_name):
    """prefill (queue left -> first token) + decode (first -> last token) = inference
    <= e2e: catches a phase measured from the wrong point."""
    before = scrape(http)
    client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    after = scrape(http)

    def delta(name):
        return metric(after, name) - metric(before, name)

    prefill, decode = delta("tandem:request_prefill_time_seconds_sum"), delta("tandem:request_decode_time_seconds_sum")
    inference = delta("tandem:request_inference_time_seconds_sum")
    assert prefill >= 0 and decode >= 0
    assert abs(prefill + decode - inference) < 1e-6
    assert 0 < inference <= delta("tandem:e2e_request_latency_seconds_sum")
