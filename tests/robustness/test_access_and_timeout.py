"""The optional API key (401 in OpenAI's envelope on every /v1 route without
it; /health and /metrics open) and the per-request timeout (408, the request
aborted in the backend). First on the HTTP app over the in-test backend, then
through `tandem serve --api-key --request-timeout` with real workers."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.api.fake_backend import MARK_SLOW, FakeBackend
from tests.api.helpers import metric, sse_data
from tests.helpers import UvicornThread, launch_server, wait_until
from tests.robustness.support import MODEL, assert_envelope, tiny_server_config

KEY = "sk-tandem-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- API key, on the app ----------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(smollm_tokenizer, base_settings):
    from dataclasses import replace

    from server.app import create_app

    backend = FakeBackend(smollm_tokenizer)
    with UvicornThread(create_app(backend, smollm_tokenizer, replace(base_settings, api_key=KEY))) as server:
        yield server.url, backend


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
    ("GET", "/v1/no-such-route", None),  # 401 before 404: the key guards the whole /v1 tree
])
def test_v1_routes_need_the_key(keyed, method, path, body):
    url, backend = keyed
    submitted = len(backend.requests)
    missing = httpx.request(method, url + path, json=body, timeout=10)
    error = assert_envelope(missing, 401)
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.request(method, url + path, json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert "Incorrect API key" in assert_envelope(wrong, 401)["message"]
    basic = httpx.request(method, url + path, json=body, headers={"Authorization": f"Basic {KEY}"}, timeout=10)
    assert_envelope(basic, 401)
    assert len(backend.requests) == submitted  # nothing reached the backend
    right = httpx.request(method, url + path, json=body, headers=AUTH, timeout=10)
    assert right.status_code == (404 if "no-such" in path else 200), right.text


def test_health_and_metrics_stay_open(keyed):
    url, _ = keyed
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    metrics = httpx.get(f"{url}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert metric(metrics.text, "tandem:request_failure_total", reason="unauthorized") >= 1


def test_openai_sdk_with_and_without_the_key(keyed):
    url, _ = keyed
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as good:
        assert good.completions.create(model=MODEL, prompt="hi", max_tokens=3).choices[0].text
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            bad.models.list()


def test_scheme_is_case_insensitive(keyed):
    url, _ = keyed
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {KEY}"}, timeout=10).status_code == 200


# -- timeout, on the app ------------------------------------------------------------------


@pytest.fixture(scope="module")
def timed(smollm_tokenizer, base_settings):
    from dataclasses import replace

    from server.app import create_app

    backend = FakeBackend(smollm_tokenizer)
    with UvicornThread(create_app(backend, smollm_tokenizer, replace(base_settings, request_timeout_s=0.4))) as server:
        yield server.url, backend


def test_timeout_non_streaming_is_408_and_aborts(timed):
    url, backend = timed
    before = len(backend.requests)
    start = time.monotonic()
    # MARK_SLOW: 50 ms per output, no EOS: 200 tokens would take seconds
    response = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": MARK_SLOW, "max_tokens": 200, "n": 2})
    elapsed = time.monotonic() - start
    error = assert_envelope(response, 408)
    assert error["type"] == "timeout_error" and error["code"] == "request_timeout"
    assert "0.4 s" in error["message"]
    assert 0.35 < elapsed < 2.0
    ids = [r.request_id for r in backend.requests[before:]]
    assert len(ids) == 2 and wait_until(lambda: set(ids) <= backend.closed_early, timeout_s=5, interval_s=0.01)  # both choices aborted


def test_timeout_mid_stream_is_an_error_event(timed):
    url, backend = timed
    before = len(backend.requests)
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": MARK_SLOW}], "max_tokens": 200,
            "stream": True}) as response:
        assert response.status_code == 200  # the stream began before the deadline
        events = sse_data(response)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "timeout_error" and "timeout" in error["message"]
    (request,) = backend.requests[before:]
    assert wait_until(lambda: request.request_id in backend.closed_early, timeout_s=5, interval_s=0.01)
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert metric(metrics, "tandem:request_failure_total", reason="timeout") >= 1


def test_requests_within_the_timeout_are_untouched(timed):
    url, _ = timed
    response = httpx.post(f"{url}/v1/completions", timeout=30, json={"model": MODEL, "prompt": "hi", "max_tokens": 8})
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -- through `tandem serve`, real workers ----------------------------------------------------


def test_served_with_key_and_timeout(tmp_path, tiny_target_dir):
    config = tiny_server_config(tmp_path / "tiny.yaml", tiny_target_dir, scheduler={"max_model_len": 4096})
    with launch_server(config, "--api-key", KEY, "--request-timeout", "1.0", mode="ar") as server:
        url = server.url
        assert_envelope(httpx.get(f"{url}/v1/models", timeout=10), 401)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        ok = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=30,
                        json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert ok.status_code == 200, ok.text
        # 4000 tokens take several seconds: the timeout ends it and the workers drop it
        slow = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 4000, "temperature": 0})
        assert assert_envelope(slow, 408)["type"] == "timeout_error"
        assert wait_until(lambda: server.metric("tandem:num_requests_running") == 0, timeout_s=10)
        again = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=30,
                           json={"model": MODEL, "prompt": "hi", "max_tokens": 4, "temperature": 0})
        assert again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
