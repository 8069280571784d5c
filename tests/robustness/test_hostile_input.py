"""A battery of hostile requests against a real launched server (tiny model,
verify + draft workers): each gets a 4xx with OpenAI's error envelope and a
message naming the problem, and the server stays healthy afterwards (/health
200 and a greedy completion equal to the one before the battery)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.robustness.support import MODEL, assert_envelope, assert_serving, greedy

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def comp(**fields) -> bytes:
    return json.dumps({"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}).encode()


def chat(**fields) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                       **fields}).encode()


def without(body: bytes, key: str) -> bytes:
    data = json.loads(body)
    del data[key]
    return json.dumps(data).encode()


DEEP = b"[" * 100_000 + b"]" * 100_000

# (id, path, raw body, status, words the message must hold (lowercase), extra headers)
CASES = [
    ("malformed-json", COMPLETIONS, b'{"model": "tiny", "prompt": ', 400, ["json"]),
    ("trailing-garbage", COMPLETIONS, comp() + b"}}", 400, ["json"]),
    ("not-an-object", COMPLETIONS, b"[1, 2, 3]", 400, ["json object"]),
    ("empty-body", COMPLETIONS, b"", 400, ["empty"]),
    ("wrong-type-temperature", COMPLETIONS, comp(temperature="hot"), 400, ["temperature"]),
    ("wrong-type-max-tokens", COMPLETIONS, comp(max_tokens="10"), 400, ["max_tokens"]),
    ("wrong-type-stream", CHAT, chat(stream="yes"), 400, ["stream"]),
    ("wrong-type-messages", CHAT, chat(messages="hi"), 400, ["messages"]),
    ("wrong-type-model", COMPLETIONS, comp(model=7), 400, ["model"]),
    ("missing-model", COMPLETIONS, without(comp(), "model"), 400, ["missing", "model"]),
    ("missing-prompt", COMPLETIONS, without(comp(), "prompt"), 400, ["missing", "prompt"]),
    ("missing-messages", CHAT, without(chat(), "messages"), 400, ["missing", "messages"]),
    ("missing-content", CHAT, chat(messages=[{"role": "user"}]), 400, ["missing", "content"]),
    ("negative-max-tokens", COMPLETIONS, comp(max_tokens=-5), 400, ["max_tokens"]),
    ("zero-max-tokens", CHAT, chat(max_tokens=0), 400, ["max_tokens"]),
    ("huge-max-tokens", COMPLETIONS, comp(max_tokens=10**12), 400, ["max_tokens", "context length"]),
    ("astronomic-max-tokens", CHAT, chat(max_tokens=10**40), 400, ["context length"]),
    ("temperature-high", COMPLETIONS, comp(temperature=2.5), 400, ["temperature"]),
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, ["temperature"]),
    ("temperature-nan", COMPLETIONS, comp()[:-1] + b', "temperature": NaN}', 400, ["temperature"]),
    ("top-p-zero", COMPLETIONS, comp(top_p=0), 400, ["top_p"]),
    ("top-p-high", CHAT, chat(top_p=1.5), 400, ["top_p"]),
    ("top-p-infinity", CHAT, chat()[:-1] + b', "top_p": Infinity}', 400, ["top_p"]),
    ("n-too-large", COMPLETIONS, comp(n=1000), 400, ["'n'", "at most"]),
    ("n-zero", CHAT, chat(n=0), 400, ["'n'"]),
    ("too-many-prompts", COMPLETIONS, comp(prompt=["hi"] * 100), 400, ["at most", "at a time"]),
    ("prompt-beyond-context-text", COMPLETIONS, comp(prompt="word " * 600), 400, ["context length", "512"]),
    ("prompt-beyond-context-ids", COMPLETIONS, comp(prompt=[100] * 600), 400, ["context length", "600"]),
    ("prompt-plus-max-tokens", COMPLETIONS, comp(prompt=[100] * 500, max_tokens=50), 400, ["context length"]),
    ("chat-beyond-context", CHAT, chat(messages=[{"role": "user", "content": "word " * 600}]), 400,
     ["context length"]),
    ("token-id-too-large", COMPLETIONS, comp(prompt=[1, 2, 10**6]), 400, ["vocabulary", "1000000"]),
    ("token-id-negative", COMPLETIONS, comp(prompt=[[1, 2], [-1]]), 400, ["vocabulary"]),
    ("token-id-beyond-int64", COMPLETIONS, comp(prompt=[10**30]), 400, ["vocabulary"]),
    ("unknown-model", COMPLETIONS, comp(model="gpt-17"), 404, ["gpt-17", "does not exist"]),
    ("unknown-model-chat", CHAT, chat(model="gpt-17"), 404, ["gpt-17"]),
    ("too-many-stops", COMPLETIONS, comp(stop=list("abcdefgh")), 400, ["stop"]),
    ("empty-stop", CHAT, chat(stop=[""]), 400, ["stop"]),
    ("unsupported-suffix", COMPLETIONS, comp(suffix="end"), 400, ["suffix"]),
    ("presence-penalty-out-of-range", COMPLETIONS, comp(presence_penalty=2.5), 400, ["presence_penalty"]),
    ("logit-bias-out-of-vocabulary", COMPLETIONS, comp(logit_bias={"1000000": 5}), 400, ["vocabulary"]),
    ("unsupported-tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, ["tools"]),
    ("unsupported-response-format", CHAT, chat(response_format={"type": "json_object"}), 400,
     ["response_format"]),
    ("unknown-parameter", COMPLETIONS, comp(use_beam_search=True), 400, ["use_beam_search"]),
    ("deeply-nested-body", COMPLETIONS, DEEP, 400, ["nested too deeply"]),
    ("deeply-nested-field", CHAT, chat()[:-1] + b', "user": ' + DEEP + b"}", 400, ["nested too deeply"]),
    ("nested-in-tools", CHAT, chat()[:-1] + b', "tools": [' + b'{"a":' * 500 + b"1" + b"}" * 500 + b"]}", 400,
     ["tools"]),
    ("empty-messages", CHAT, chat(messages=[]), 400, ["messages"]),
    ("unknown-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, ["role"]),
    ("tool-role", CHAT, chat(messages=[{"role": "tool", "content": "hi"}]), 400, ["role"]),
    ("content-number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, ["content"]),
    ("content-object", CHAT, chat(messages=[{"role": "user", "content": {"text": "hi"}}]), 400, ["content"]),
    ("content-image-part", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, ["image_url"]),
    ("message-not-object", CHAT, chat(messages=["hi"]), 400, ["messages[0]"]),
    ("invalid-utf8", COMPLETIONS, b'{"model": "tiny", "prompt": "\xff\xfe abc"}', 400, ["utf-8"]),
    ("lone-surrogate-prompt", COMPLETIONS, b'{"model": "tiny", "prompt": "\\ud800abc"}', 400, ["surrogate", "prompt"]),
    ("lone-surrogate-stop", COMPLETIONS, comp()[:-1] + b', "stop": "\\ud800"}', 400, ["surrogate", "stop"]),
    ("lone-surrogate-content", CHAT,
     b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udc00b"}]}', 400,
     ["surrogate", "messages[0].content"]),
    ("lone-surrogate-model", COMPLETIONS, b'{"model": "\\ud83d", "prompt": "x"}', 400, ["surrogate", "model"]),
    ("number-too-large", COMPLETIONS, comp()[:-1] + b', "seed": 1' + b"0" * 5000 + b"}", 400, ["number"]),
    ("seed-beyond-int64", COMPLETIONS, comp(seed=2**70), 400, ["seed"]),
    ("logprobs-out-of-range", COMPLETIONS, comp(logprobs=50), 400, ["logprobs"]),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400,
     ["stream_options"]),
]


@pytest.fixture(scope="module")
def server(robust_server):
    before = greedy(robust_server.url)
    yield robust_server
    assert_serving(robust_server.url, expected=before)  # the battery changed nothing


@pytest.mark.parametrize("path,body,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request_is_refused_and_server_stays_healthy(server, path, body, status, words):
    response = httpx.post(f"{server.url}{path}", content=body, headers=JSON, timeout=30)
    error = assert_envelope(response, status)
    message = error["message"].lower()
    for word in words:
        assert word.lower() in message, error
    assert error["type"] == "invalid_request_error"
    assert_serving(server.url)


def test_ten_megabyte_body_is_413(server):
    body = comp(prompt="x" * 10_000_000)
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=body, headers=JSON, timeout=60)
    error = assert_envelope(response, 413)
    assert "exceeds the limit of 1000000 bytes" in error["message"]
    assert_serving(server.url)


def test_wrong_content_type(server):
    response = httpx.post(f"{server.url}{COMPLETIONS}", content=comp(), headers={"content-type": "text/plain"},
                          timeout=30)
    assert "application/json" in assert_envelope(response, 400)["message"]


def test_hostile_streaming_request_gets_json_error_not_a_stream(server):
    response = httpx.post(f"{server.url}{CHAT}", content=chat(stream=True, temperature=9), headers=JSON, timeout=30)
    assert "temperature" in assert_envelope(response, 400)["message"]


def test_refusals_are_counted(server):
    before = server.metric("tandem:request_failure_total", reason="invalid_request")
    httpx.post(f"{server.url}{COMPLETIONS}", content=b"[" * 5000, headers=JSON, timeout=30)
    httpx.post(f"{server.url}{COMPLETIONS}", content=comp(top_p=7), headers=JSON, timeout=30)
    assert server.metric("tandem:request_failure_total", reason="invalid_request") == before + 2


@pytest.mark.parametrize("fields", [
    {"temperature": 1e-62},  # served as greedy: dividing logits by it would overflow
    {"temperature": 1e-5, "seed": 1},
    {"temperature": 2.0, "top_p": 1e-300, "seed": 2},
    {"temperature": 1.0, "top_k": 10**9, "seed": 2**63 - 1},
    {"temperature": 1.0, "seed": -(2**63)},
    {"temperature": 0.7, "top_k": 1, "n": 8, "seed": 0},
], ids=["tiny-temperature", "min-temperature", "tiny-top-p", "huge-top-k", "min-seed", "top-k-1-n-8"])
def test_extreme_but_valid_sampling_is_served(server, fields):
    body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 8, **fields}
    response = httpx.post(f"{server.url}{COMPLETIONS}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    texts = [c["text"] for c in response.json()["choices"]]
    if fields.get("temperature", 1) < 1e-5 or fields.get("top_k") == 1 or fields.get("top_p", 1) < 1e-100:
        assert set(texts) == {greedy(server.url)}  # a single candidate token: greedy's text
    assert_serving(server.url)
