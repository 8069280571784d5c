"""Overload against a real launched server (mode `ar`: the bound lives in the
server and the verify worker, the same in every mode) whose engine takes 1
running + 1 waiting request: a flood beyond that bound is answered 429 at once (JSON
envelope, Retry-After, streaming requests too), the admitted requests finish
untouched, and the server serves normally afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import launch_server, wait_until
from tests.robustness.support import MODEL, assert_envelope, assert_serving, greedy, tiny_server_config

LONG_TOKENS = 1000  # about a second each on the tiny model: the flood lands while they run


@pytest.fixture(scope="module")
def small_server(tmp_path_factory, tiny_target_dir):
    config = tiny_server_config(
        tmp_path_factory.mktemp("overload") / "tiny.yaml", tiny_target_dir,
        scheduler={"max_model_len": 1024, "max_running_requests": 1, "max_waiting_requests": 1},
    )
    with launch_server(config, mode="ar") as server:
        yield server


def long_request(url: str, prompt: str) -> dict:
    response = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": LONG_TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def flood_request(client: httpx.Client, i: int) -> tuple[httpx.Response, float]:
    chat, stream = i % 2 == 0, i % 4 < 2
    body = {"model": MODEL, "max_tokens": 64, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": f"flood {i}"}]
    else:
        body["prompt"] = f"flood {i}"
    start = time.perf_counter()
    with client.stream("POST", f"/v1/{'chat/' if chat else ''}completions", json=body) as r:
        r.read()
    return r, time.perf_counter() - start


def test_flood_beyond_the_bound_gets_429_at_once(small_server):
    url = small_server.url
    expected = greedy(url, "one", LONG_TOKENS), greedy(url, "two", LONG_TOKENS)  # alone, one at a time
    overloaded_before = small_server.metric("tandem:request_failure_total", reason="overloaded")
    with ThreadPoolExecutor(2) as admitted_pool:
        admitted = [admitted_pool.submit(long_request, url, p) for p in ("one", "two")]
        # both are in: one running, one waiting in the verify worker's queue
        assert wait_until(lambda: small_server.metric("tandem:num_requests_running") == 1
                          and small_server.metric("tandem:num_requests_waiting") == 1, timeout_s=20, interval_s=0.02)
        with ThreadPoolExecutor(8) as flood_pool, httpx.Client(base_url=url, timeout=30) as client:
            refused = list(flood_pool.map(lambda i: flood_request(client, i), range(8)))
        assert not any(f.done() for f in admitted), "the admitted requests ended before the flood was answered"
        results = [f.result() for f in admitted]

    for response, seconds in refused:
        error = assert_envelope(response, 429)  # a streaming request too: JSON, not an event stream
        assert error["type"] == "rate_limit_error" and "busy" in error["message"]
        assert response.headers["retry-after"] == "1"
        assert seconds < 1.0, f"a refusal took {seconds:.2f} s"
    print(f"429 latencies (s): {sorted(round(s, 3) for _, s in refused)}")
    # the admitted requests were untouched by the flood
    assert [r["choices"][0]["text"] for r in results] == list(expected)
    assert small_server.metric("tandem:request_failure_total", reason="overloaded") == overloaded_before + 8
    assert wait_until(lambda: small_server.metric("tandem:num_requests_running") == 0, timeout_s=20, interval_s=0.02)
    assert_serving(url)


def test_more_choices_than_the_bound_is_400_not_429(small_server):
    # n=3 can never fit a bound of 2: retrying would not help, so it is not a 429
    response = httpx.post(f"{small_server.url}/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x", "max_tokens": 2, "n": 3})
    error = assert_envelope(response, 400)
    assert "at most 2" in error["message"] and error["param"] == "n"
    assert_serving(small_server.url)
