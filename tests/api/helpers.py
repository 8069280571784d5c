"""Small helpers shared by the API tests (raw SSE, Prometheus text, errors)."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families


def sse_data(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order ([DONE] included)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def post_stream(http: httpx.Client, path: str, body: dict) -> tuple[int, list[str]]:
    with http.stream("POST", path, json=body) as response:
        return response.status_code, sse_data(response)


def assert_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    """The response is `status` with OpenAI's error envelope; returns the error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def metric(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples called `sample_name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def scrape(http: httpx.Client) -> str:
    response = http.get("/metrics")
    assert response.status_code == 200
    return response.text


def chunks(events: list[str]) -> list[dict]:
    """Parsed chunks of an SSE stream that ended with [DONE]."""
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]
