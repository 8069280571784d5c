"""Hypothesis-generated request bodies POSTed to /v1/completions and
/v1/chat/completions: never a 5xx, OpenAI's envelope on every 4xx, a
well-formed answer on every 200 (a stream ends with [DONE] and carries no
error event), and a healthy server afterwards. Bodies mix plausible values of
every parameter with arbitrary JSON, unknown keys, non-objects and raw bytes.

Against the HTTP app over the in-test backend (many examples, fast; there
every request that reaches the engine must be one the workers can run) and a
short run against the real launched tiny server (verify + draft workers)."""

from __future__ import annotations

import json
from dataclasses import replace

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.helpers import UvicornThread
from tests.robustness.support import MODEL, BoundedFakeBackend, assert_envelope, assert_serving

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates included
texts = st.text(max_size=40)
words = st.text(min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, 49_151), min_size=1, max_size=12)
roles = st.sampled_from(["system", "developer", "user", "assistant"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}), min_size=1, max_size=3)

# valid values of every parameter: a body starts valid, then a few mutations break it
VALID = {
    "max_tokens": st.integers(1, 16),
    "temperature": st.floats(0, 2) | st.sampled_from([0, 5e-324, 1e-62, 1e-6, 1e-5, 2]),
    "top_p": st.floats(0.01, 1) | st.sampled_from([5e-324, 1e-300, 1]),
    "top_k": st.integers(-1, 50),
    "n": st.integers(1, 3),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
    "stream": st.booleans(),
    "user": texts,
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 100),
    "logit_bias": st.dictionaries(st.integers(0, 49151).map(str), st.floats(-100, 100), max_size=3),
    "min_p": st.floats(0, 1),
    "min_tokens": st.integers(0, 1),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=3),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
}
VALID_COMPLETION = {**VALID, "prompt": words | token_ids | st.lists(words, min_size=1, max_size=3),
                    "echo": st.booleans(), "logprobs": st.integers(0, 20), "best_of": st.just(1)}
VALID_CHAT = {**VALID, "messages": messages, "logprobs": st.booleans(), "max_completion_tokens": st.integers(1, 16)}

# what a mutation puts in a parameter: out of range, the wrong type, any JSON
JUNK = {
    "model": st.sampled_from(["gpt-4o", "", MODEL.upper()]) | any_text | json_values,
    "prompt": any_text | st.lists(st.integers(), max_size=5) | st.lists(texts, max_size=3) | st.just([[]]),
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["tool", "function", "nobody", "user"])},
        optional={"content": any_text | st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2) | json_values,
            "name": json_values}), max_size=3),
    "max_tokens": st.integers() | st.integers(-3, 0),
    "max_completion_tokens": st.integers(-3, 0),
    "temperature": st.floats(allow_nan=False) | st.sampled_from([-0.1, 2.01]),
    "top_p": st.floats(allow_nan=False) | st.sampled_from([0, 1.01]),
    "top_k": st.integers(),
    "n": st.integers(),
    "seed": st.integers(),
    "stop": st.lists(any_text, max_size=10) | st.just(""),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": json_values,
                                                          "include_obfuscation": st.booleans()}),
    "logprobs": st.integers(-1, 30) | st.booleans(),
    "top_logprobs": st.integers(-1, 22),
    "echo": json_values,
    "best_of": st.integers(-1, 5),
    "suffix": texts,
    "presence_penalty": st.floats(allow_nan=False) | st.sampled_from([-2.01, 2.01]),
    "frequency_penalty": st.floats(allow_nan=False) | st.sampled_from([-2.01, 2.01]),
    "repetition_penalty": st.floats(allow_nan=False) | st.sampled_from([0, -1, 1e-300, 101]),
    "logit_bias": st.dictionaries(st.text(max_size=5) | st.integers().map(str), json_values, max_size=2),
    "min_p": st.floats(allow_nan=False) | st.sampled_from([-0.01, 1.01]),
    "min_tokens": st.integers(),
    "stop_token_ids": st.lists(st.integers(), max_size=3) | json_values,
    "ignore_eos": json_values,
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["tokenize", "enable_thinking", "x"]), json_values),
    "continue_final_message": st.booleans(),
    "add_generation_prompt": st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | json_values,
    "tools": st.lists(json_values, max_size=2),
    "tool_choice": st.sampled_from(["none", "auto"]) | json_values,
    "store": json_values,
}


@st.composite
def request_bodies(draw, chat: bool) -> dict:
    valid = VALID_CHAT if chat else VALID_COMPLETION
    required = "messages" if chat else "prompt"
    body = {"model": MODEL, required: draw(valid[required])}
    for key in sorted(set(valid) - {required}):  # each optional parameter: present half of the time
        if draw(st.booleans()):
            body[key] = draw(valid[key])
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):  # a quarter stay valid
        kind = draw(st.sampled_from(["junk", "junk", "junk", "any", "drop", "unknown"]))
        key = draw(st.sampled_from(sorted(JUNK)))
        if kind == "junk":
            body[key] = draw(JUNK[key])
        elif kind == "any":
            body[key] = draw(json_values)
        elif kind == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif kind == "unknown":
            body[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return body


def raw_bodies(chat: bool):
    """Mostly JSON objects; sometimes any JSON, or bytes that may not be JSON at all."""
    return st.one_of(
        request_bodies(chat).map(json.dumps).map(str.encode),
        request_bodies(chat).map(json.dumps).map(str.encode),
        request_bodies(chat).map(json.dumps).map(str.encode),
        request_bodies(chat).map(json.dumps).map(str.encode),
        json_values.map(json.dumps).map(str.encode),
        st.binary(max_size=64),
    )


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert_envelope(response)
        return
    assert response.status_code == 200, response.text[:500]
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event
    else:
        assert response.json()["choices"], response.text[:500]


def post(client: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": "application/json"})


def bounded_for_real_workers(body: bytes) -> bytes:
    """Keep generations short on the real server: a valid request would otherwise
    run to the end of the context (seconds each on the tiny model)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict):
        data.pop("max_completion_tokens", None)
        if not (isinstance(data.get("max_tokens"), int) and data["max_tokens"] <= 16):
            data["max_tokens"] = 8
        body = json.dumps(data).encode()
    return body


# -- the HTTP app over the in-test backend ----------------------------------------------------


MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def fake_backend(smollm_tokenizer, base_settings):
    from server.app import create_app

    backend = BoundedFakeBackend(smollm_tokenizer, max_pending=16)
    app = create_app(backend, smollm_tokenizer, replace(base_settings, max_model_len=MAX_MODEL_LEN))
    with UvicornThread(app) as server:
        backend.url = server.url
        yield backend
        assert_serving_fake(server.url)
    assert backend.num_pending == 0


def assert_serving_fake(url: str) -> None:
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4}, timeout=10)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def fake_client(fake_backend):
    with httpx.Client(base_url=fake_backend.url, timeout=30) as client:
        yield client


def assert_runnable(request, vocab_size: int) -> None:
    """What the server submits, the engine can run: the API's checks leave nothing to the workers."""
    s = request.sampling
    assert s.temperature == 0.0 or 1e-5 <= s.temperature <= 2.0, s
    assert 0.0 < s.top_p <= 1.0 and s.top_k >= 0 and 0 <= s.seed < 2**63, s
    assert request.prompt_ids and all(0 <= t < vocab_size for t in request.prompt_ids)
    assert request.max_tokens >= 1 and len(request.prompt_ids) + request.max_tokens <= MAX_MODEL_LEN
    assert request.num_logprobs is None or 0 <= request.num_logprobs <= 20
    assert 0.0 <= s.min_p <= 1.0 and 0.01 <= s.repetition_penalty <= 100, s
    assert -2 <= s.presence_penalty <= 2 and -2 <= s.frequency_penalty <= 2, s
    assert all(0 <= t < vocab_size and -100 <= b <= 100 for t, b in s.logit_bias.items()), s
    assert all(0 <= t < vocab_size for t in request.stop_token_ids)
    assert 0 <= s.min_tokens <= request.max_tokens, s


FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(body=raw_bodies(chat=False))
def test_fuzz_completions_on_the_app(fake_backend, fake_client, smollm_tokenizer, body):
    submitted = len(fake_backend.requests)
    check_answer(post(fake_client, COMPLETIONS, body))
    for request in fake_backend.requests[submitted:]:
        assert_runnable(request, len(smollm_tokenizer))


@FUZZ
@given(body=raw_bodies(chat=True))
def test_fuzz_chat_on_the_app(fake_backend, fake_client, smollm_tokenizer, body):
    submitted = len(fake_backend.requests)
    check_answer(post(fake_client, CHAT, body))
    for request in fake_backend.requests[submitted:]:
        assert_runnable(request, len(smollm_tokenizer))


# -- the real launched server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def real_client(robust_server):
    with httpx.Client(base_url=robust_server.url, timeout=30) as client:
        yield client
    assert_serving(robust_server.url)


# no shrinking here: a failure on real workers may cost a timeout per replay
REAL = settings(FUZZ, max_examples=40, phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)


@REAL
@given(body=raw_bodies(chat=False))
def test_fuzz_completions_on_real_workers(real_client, body):
    check_answer(post(real_client, COMPLETIONS, bounded_for_real_workers(body)))


@REAL
@given(body=raw_bodies(chat=True))
def test_fuzz_chat_on_real_workers(real_client, body):
    check_answer(post(real_client, CHAT, bounded_for_real_workers(body)))
