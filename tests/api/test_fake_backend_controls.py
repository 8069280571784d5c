"""Tests that steer the in-test FakeBackend (`app_engine`): backend failures,
overload, health, aborts on disconnect and on stop strings, and exactly what
the backend was asked for. They need the fake's controls, so they do not run
against a real launched server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.api.fake_backend import MARK_FAIL, MARK_OVERLOADED, MARK_SLOW
from tests.api.helpers import assert_error, chunks, metric, post_stream, scrape
from tests.helpers import wait_until


@pytest.fixture(scope="session")
def server_url(fake_server_url):
    """These tests steer the fake backend: only its server."""
    return fake_server_url


@pytest.fixture(scope="session")
def model_name():
    from tests.api.conftest import TEST_MODEL_NAME

    return TEST_MODEL_NAME


def new_requests(backend, before: int):
    return backend.requests[before:]


# -- backend failures ---------------------------------------------------------------------


def test_engine_error_non_stream_is_500(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": MARK_FAIL, "max_tokens": 50})
    error = assert_error(r, 500)
    assert error["type"] == "server_error" and "simulated backend failure" in error["message"]


def test_engine_error_mid_stream_is_an_sse_error_event(http, model_name):
    status, events = post_stream(http, "/v1/chat/completions", {
        "model": model_name, "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": MARK_FAIL}],
    })
    assert status == 200
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"  # the stream had begun
    error = payloads[-1]["error"]
    assert set(error) == {"message", "type", "param", "code"} and "simulated backend failure" in error["message"]
    assert all("error" not in p for p in payloads[:-1])


def test_engine_error_mid_stream_through_the_sdk(client, model_name):
    stream = client.completions.create(model=model_name, prompt=MARK_FAIL, max_tokens=50, stream=True)
    with pytest.raises(openai.APIError, match="simulated backend failure"):
        list(stream)


def test_one_failing_choice_fails_the_request_and_aborts_the_others(http, model_name, app_engine):
    before = len(app_engine.requests)
    r = http.post("/v1/completions", json={"model": model_name, "prompt": [MARK_FAIL, MARK_SLOW],
                                           "max_tokens": 200})
    assert_error(r, 500)
    (failed, slow) = new_requests(app_engine, before)
    assert wait_until(lambda: slow.request_id in app_engine.closed_early, timeout_s=3, interval_s=0.01)


def test_overloaded_is_429(http, client, model_name):
    assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": MARK_OVERLOADED}), 429)
    # A stream refused before its first output keeps the status code too.
    with http.stream("POST", "/v1/completions", json={"model": model_name, "prompt": MARK_OVERLOADED,
                                                      "stream": True}) as r:
        r.read()
        assert_error(r, 429)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=model_name, prompt=MARK_OVERLOADED)


def test_unhealthy_engine(http, model_name, app_engine):
    app_engine.set_unhealthy("verify worker died")
    try:
        error = assert_error(http.get("/health"), 503)
        assert "verify worker died" in error["message"]
        assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": "hi"}), 503)
    finally:
        app_engine.set_healthy()
    assert http.get("/health").status_code == 200


# -- aborts: the backend generator is closed early ----------------------------------------


def test_stream_disconnect_aborts_the_engine_request(server_url, http, model_name, app_engine):
    def disconnects() -> float:
        return metric(scrape(http), "tandem:request_failure_total", reason="client_disconnected")

    disconnects_before = disconnects()
    before = len(app_engine.requests)
    with httpx.Client(base_url=server_url, timeout=10) as other:
        with other.stream("POST", "/v1/completions", json={
            "model": model_name, "prompt": MARK_SLOW, "max_tokens": 400, "stream": True,
        }) as r:
            lines = r.iter_lines()  # keep it: dropping a half-read iterator closes the connection
            while not next(lines).startswith("data: "):
                pass
            (request,) = new_requests(app_engine, before)
            assert request.request_id not in app_engine.closed_early
            assert metric(scrape(http), "tandem:num_requests_running") >= 1
        # leaving the block closes the connection mid-stream
    assert wait_until(lambda: request.request_id in app_engine.closed_early, timeout_s=3, interval_s=0.01)
    assert request.request_id not in app_engine.finished
    assert wait_until(lambda: disconnects() == disconnects_before + 1, timeout_s=3, interval_s=0.01)
    assert metric(scrape(http), "tandem:num_requests_running") == 0


def test_non_stream_disconnect_aborts_the_engine_request(server_url, model_name, app_engine):
    before = len(app_engine.requests)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server_url}/v1/completions", timeout=0.5,
                   json={"model": model_name, "prompt": MARK_SLOW, "max_tokens": 400})
    (request,) = new_requests(app_engine, before)
    assert wait_until(lambda: request.request_id in app_engine.closed_early, timeout_s=3, interval_s=0.01)


def test_stop_string_aborts_the_engine_request(client, model_name, app_engine):
    prompt = f"{MARK_SLOW} stop test"
    text = client.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = text.strip()[2:5]
    before = len(app_engine.requests)
    r = client.completions.create(model=model_name, prompt=prompt, max_tokens=400, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
    (request,) = new_requests(app_engine, before)
    assert wait_until(lambda: request.request_id in app_engine.closed_early, timeout_s=3, interval_s=0.01)
    assert r.usage.completion_tokens < 20


# -- what the backend is asked for ----------------------------------------------------------


def test_generate_request_fields(client, model_name, app_engine, app_settings):
    before = len(app_engine.requests)
    client.completions.create(model=model_name, prompt=["a", "b"], n=2, max_tokens=5, temperature=0.7,
                              top_p=0.9, seed=41, logprobs=3, extra_body={"top_k": -1})
    reqs = new_requests(app_engine, before)
    assert [r.sampling.seed for r in reqs] == [41, 42, 43, 44]
    assert len({r.request_id for r in reqs}) == 4
    for r in reqs:
        assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (0.7, 0.9, 0)
        assert r.max_tokens == 5 and r.num_logprobs == 3
        assert r.stop_token_ids == list(app_settings.eos_token_ids)


def test_unseeded_requests_draw_seeds(client, model_name, app_engine):
    before = len(app_engine.requests)
    client.completions.create(model=model_name, prompt="x", max_tokens=2, n=2)
    client.completions.create(model=model_name, prompt="x", max_tokens=2)
    first, second, third = new_requests(app_engine, before)
    assert second.sampling.seed == (first.sampling.seed + 1) % 2**63
    assert third.sampling.seed != first.sampling.seed
    assert first.num_logprobs is None and first.sampling.temperature == 1.0


def test_chat_defaults_to_the_rest_of_the_context(client, model_name, app_engine, app_settings):
    before = len(app_engine.requests)
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True)
    (request,) = new_requests(app_engine, before)
    assert request.max_tokens == app_settings.max_model_len - r.usage.prompt_tokens
    assert request.num_logprobs == 0
    assert r.usage.total_tokens <= app_settings.max_model_len


def test_speculation_field_sums_over_choices(http, model_name):
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "x", "max_tokens": 20, "n": 3})
    body = r.json()
    spec = body["speculation"]
    assert spec["num_target_passes"] >= 3  # at least one pass per choice
    assert spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    # Each pass yields accepted drafts + 1 token, so tokens <= passes + accepted.
    assert body["usage"]["completion_tokens"] <= spec["num_target_passes"] + spec["num_accepted_tokens"]


def test_raw_sse_framing(http, model_name):
    status, events = post_stream(http, "/v1/completions", {
        "model": model_name, "prompt": "x", "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert status == 200
    parsed = chunks(events)
    assert all("usage" in c for c in parsed)  # null on every chunk but the last, as OpenAI
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["usage"] is None for c in parsed[:-1])
    _, events = post_stream(http, "/v1/completions", {"model": model_name, "prompt": "x", "max_tokens": 5,
                                                      "stream": True})
    assert all("usage" not in c for c in chunks(events))


def test_apps_are_independent(smollm_tokenizer, app_settings):
    """create_app keeps no global state: two apps, two registries."""
    from prometheus_client import generate_latest

    from server.app import create_app
    from tests.api.fake_backend import FakeBackend

    a = create_app(FakeBackend(smollm_tokenizer), smollm_tokenizer, app_settings)
    b = create_app(FakeBackend(smollm_tokenizer), smollm_tokenizer, app_settings)
    ra, rb = a.state.tandem.metrics.registry, b.state.tandem.metrics.registry
    assert ra is not rb
    a.state.tandem.metrics.record_failure("x")
    assert b"reason=\"x\"" in generate_latest(ra) and b"reason=\"x\"" not in generate_latest(rb)
