"""Refusals: status codes and OpenAI's error envelope (backend-agnostic)."""

from __future__ import annotations

import openai
import pytest

from tests.api.helpers import assert_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def completion(model_name, **fields):
    return {"model": model_name, "prompt": "hello", "max_tokens": 4, **fields}


def chat(model_name, **fields):
    return {"model": model_name, "messages": USER, "max_tokens": 4, **fields}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_malformed_json(http, path):
    r = http.post(path, content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]


def test_body_must_be_an_object(http):
    assert_error(http.post(COMPLETIONS, json=[1, 2]), 400)
    r = http.post(COMPLETIONS, content=b'{"model": "x", "prompt": "y"}', headers={"content-type": "text/plain"})
    assert "application/json" in assert_error(r, 400)["message"]


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("max_tokens", "10"), ("n", 1.5), ("stream", "yes"), ("stop", 5),
    ("seed", "42"), ("top_p", [0.5]), ("logprobs", True),
])
def test_wrong_types_name_the_parameter(http, model_name, field, value):
    error = assert_error(http.post(COMPLETIONS, json=completion(model_name, **{field: value})), 400, field)
    assert field in error["message"]


@pytest.mark.parametrize("path,body,param", [
    (COMPLETIONS, {"prompt": "x"}, "model"),
    (COMPLETIONS, {"model": "MODEL"}, "prompt"),
    (CHAT, {"model": "MODEL"}, "messages"),
    (CHAT, {"model": "MODEL", "messages": [{"role": "user"}]}, "messages[0].content"),
])
def test_missing_fields(http, model_name, path, body, param):
    body = {k: (model_name if v == "MODEL" else v) for k, v in body.items()}
    error = assert_error(http.post(path, json=body), 400, param)
    assert "Missing required parameter" in error["message"]


@pytest.mark.parametrize("path,make", [(COMPLETIONS, completion), (CHAT, chat)])
def test_unknown_field_named(http, model_name, path, make):
    error = assert_error(http.post(path, json=make(model_name, use_beam_search=True)), 400, "use_beam_search")
    assert "use_beam_search" in error["message"]


@pytest.mark.parametrize("path,make,field,value", [
    (COMPLETIONS, completion, "best_of", 3),
    (COMPLETIONS, completion, "suffix", " the end"),
    (CHAT, chat, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (CHAT, chat, "tool_choice", "required"),
    (CHAT, chat, "response_format", {"type": "json_object"}),
    (CHAT, chat, "store", True),
])
def test_unsupported_parameters_refused(http, model_name, path, make, field, value):
    error = assert_error(http.post(path, json=make(model_name, **{field: value})), 400, field)
    assert field in error["message"]


def test_unsupported_parameter_through_the_sdk(client, model_name):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=2, suffix=" the end")
    assert "suffix" in str(info.value)


def test_neutral_values_of_unsupported_parameters_accepted(http, model_name):
    r = http.post(COMPLETIONS, json=completion(model_name, presence_penalty=0, frequency_penalty=0.0,
                                                 logit_bias={}, best_of=1, user="me", seed=None))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("top_p", 0), ("top_k", -5), ("n", 0), ("n", 1000), ("max_tokens", 0),
    ("logprobs", 21), ("stop", ["a", "b", "c", "d", "e", "f", "g", "h", "i"]),
])
def test_out_of_range(http, model_name, field, value):
    assert_error(http.post(COMPLETIONS, json=completion(model_name, **{field: value})), 400, field)


def test_max_tokens_zero_without_echo_says_why(http, model_name):
    error = assert_error(http.post(COMPLETIONS, json=completion(model_name, max_tokens=0)), 400, "max_tokens")
    assert "echo" in error["message"]


def test_chat_top_logprobs_needs_logprobs(http, model_name):
    assert_error(http.post(CHAT, json=chat(model_name, top_logprobs=2)), 400, "top_logprobs")
    assert_error(http.post(CHAT, json=chat(model_name, logprobs=True, top_logprobs=21)), 400, "top_logprobs")


def test_stream_options_without_stream(http, model_name):
    body = completion(model_name, stream_options={"include_usage": True})
    assert_error(http.post(COMPLETIONS, json=body), 400, "stream_options")


@pytest.mark.parametrize("path,make", [(COMPLETIONS, completion), (CHAT, chat)])
def test_unknown_model_is_404(http, model_name, path, make):
    error = assert_error(http.post(path, json={**make(model_name), "model": "gpt-17"}), 404, "model")
    assert "gpt-17" in error["message"] and model_name in error["message"]


def test_unknown_model_through_the_sdk(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=USER)


def test_oversized_body_is_413(http, model_name):
    big = completion(model_name, prompt="x" * 2_000_000)
    error = assert_error(http.post(COMPLETIONS, json=big), 413)
    assert "exceeds" in error["message"]


def test_oversized_chunked_body_is_413(http):
    def body():  # no Content-Length: the size is only known by reading
        yield b'{"model": "m", "prompt": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}'

    assert_error(http.post(COMPLETIONS, content=body(), headers={"content-type": "application/json"}), 413)


def test_prompt_too_long(http, model_name, max_model_len):
    ids = [100] * max_model_len
    error = assert_error(http.post(COMPLETIONS, json=completion(model_name, prompt=ids)), 400)
    assert str(max_model_len) in error["message"]
    ids = [100] * (max_model_len - 2)
    error = assert_error(http.post(COMPLETIONS, json=completion(model_name, prompt=ids, max_tokens=8)), 400,
                         "max_tokens")
    assert str(max_model_len) in error["message"] and str(max_model_len - 2) in error["message"]
    long_chat = chat(model_name, max_tokens=None, messages=[{"role": "user", "content": "word " * max_model_len}])
    assert_error(http.post(CHAT, json=long_chat), 400)


def test_token_ids_outside_vocabulary(http, model_name):
    for prompt in ([1, 2, 10**9], [[1, 2], [-1]]):
        error = assert_error(http.post(COMPLETIONS, json=completion(model_name, prompt=prompt)), 400, "prompt")
        assert "vocabulary" in error["message"]


@pytest.mark.parametrize("prompt", ["", [], [[]], ["ok", ""]])
def test_empty_prompt(http, model_name, prompt):
    error = assert_error(http.post(COMPLETIONS, json=completion(model_name, prompt=prompt)), 400, "prompt")
    assert "empty" in error["message"]


def test_empty_messages(http, model_name):
    assert_error(http.post(CHAT, json=chat(model_name, messages=[])), 400, "messages")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(COMPLETIONS), 405)
