"""Request schemas (server/api.py) and the error mapping (server/errors.py),
without a server: what is accepted, what is refused, and what the client is told."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.api import ChatCompletionRequest, CompletionRequest, DeltaMessage
from server.backend import BackendError, BackendOverloaded, BackendUnavailable
from server.errors import InvalidRequest, ModelNotFound, RequestTooLarge, error_reply, validation_error


def refusal(model, body) -> InvalidRequest:
    """The 400 a body would get."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return validation_error(info.value.errors())


def completion(**fields):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields):
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_completion_defaults_follow_openai():
    req = completion()
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.stream) == (16, 1.0, 1.0, 1, False)
    assert req.stop == [] and req.logprobs is None and req.seed is None and not req.include_usage


def test_null_means_default():
    req = completion(max_tokens=None, temperature=None, stop=None, n=None, presence_penalty=None)
    assert (req.max_tokens, req.temperature, req.stop, req.n) == (16, 1.0, [], 1)


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], []])
def test_prompt_forms(prompt):
    assert completion(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [[1, "a"], [[1], "a"], [1.5], [True], {"a": 1}, [[1], [2.0]], 3])
def test_bad_prompt_forms_name_the_parameter(prompt):
    err = refusal(CompletionRequest, {"model": "m", "prompt": prompt})
    assert err.param == "prompt" and "list of token ids" in err.message


def test_stop_normalised_to_a_list():
    assert completion(stop="###").stop == ["###"]
    assert completion(stop=["a", "b"]).stop == ["a", "b"]
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "stop": [""]}).param == "stop"
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "stop": [1]}).param == "stop"


def test_types_are_strict():
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", "temperature": "0.5"})
    assert err.param == "temperature" and "'temperature'" in err.message
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 1.5}).param == "max_tokens"
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "stream": "yes"}).param == "stream"
    assert completion(temperature=1).temperature == 1.0  # an int is a fine float


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.1), ("top_k", -2),
    ("n", 0), ("max_tokens", 0), ("logprobs", 21), ("seed", 2**64),
])
def test_ranges(field, value):
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", field: value}).param == field


def test_top_k_minus_one_means_off():
    assert completion(top_k=-1).top_k == -1


def test_missing_and_unknown_fields_are_named():
    err = refusal(CompletionRequest, {"prompt": "x"})
    assert err.param == "model" and err.message == "Missing required parameter: 'model'"
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", "use_beam_search": True})
    assert err.param == "use_beam_search" and "Unrecognized request argument" in err.message
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x", "x": 1}]})
    assert err.param == "messages[0].x"


@pytest.mark.parametrize("field,value", [
    ("suffix", "end"),
])
def test_unsupported_completion_parameters(field, value):
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", field: value})
    assert err.param == field and f"Unsupported parameter '{field}'" in err.message


def test_unsupported_parameters_at_neutral_values_are_accepted():
    """Accepted, and they change nothing else in the request."""
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "suffix": "", "best_of": 1, "user": "u"}
    names = set(neutral)
    assert completion(**neutral).model_dump(exclude=names) == completion().model_dump(exclude=names)
    neutral = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "store": False,
               "parallel_tool_calls": True}
    names = set(neutral)
    assert chat(**neutral).model_dump(exclude=names) == chat().model_dump(exclude=names)


def test_best_of_must_equal_n():
    assert completion(n=2, best_of=2).n == 2
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 3})
    assert err.param == "best_of" and "best_of" in err.message


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    """Catches: prompt logprobs asked without echo (a cost nobody reads), or not asked
    for max_tokens 0 (the workers need them to answer at all)."""
    assert completion(echo=True, logprobs=3).prompt_logprobs == 3
    assert completion(logprobs=3).prompt_logprobs is None and completion(echo=True).prompt_logprobs is None
    assert completion(echo=True, max_tokens=0).prompt_logprobs == 0
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": 0})
    assert err.param == "max_tokens" and "echo" in err.message


def test_stream_options_need_stream():
    assert refusal(CompletionRequest, {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}
                   ).param == "stream_options"
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert completion(stream=True, stream_options={"include_obfuscation": False}).include_usage is False
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", "stream": True,
                                      "stream_options": {"include_obfuscation": True}})
    assert err.param == "stream_options.include_obfuscation"


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("response_format", {"type": "json_object"}),
    ("store", True),
])
def test_unsupported_chat_parameters(field, value):
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          field: value})
    assert err.param == field and "Unsupported parameter" in err.message


def test_chat_messages():
    req = chat(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "name": "bot"},
    ])
    assert [m.for_template() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok", "name": "bot"},
    ]
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": []}).param == "messages"
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "tool", "content": "x"}]}
                   ).param == "messages[0].role"
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert err.param == "messages[0].content" and "image_url" in err.message


def test_chat_token_limits_and_logprobs():
    assert chat().completion_limit is None
    assert chat(max_tokens=5).completion_limit == 5
    assert chat(max_completion_tokens=7).completion_limit == 7
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": 5, "max_completion_tokens": 6}).param
    assert chat().num_logprobs is None
    assert chat(logprobs=True).num_logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).num_logprobs == 3
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                          "top_logprobs": 2})
    assert err.param == "top_logprobs"


def test_delta_omits_unset_fields():
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert DeltaMessage().model_dump() == {}
    assert DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}


# -- the error envelope -------------------------------------------------------------------


@pytest.mark.parametrize("exc,status,type_", [
    (InvalidRequest("bad", param="n"), 400, "invalid_request_error"),
    (ModelNotFound("no such model", param="model"), 404, "invalid_request_error"),
    (RequestTooLarge("big"), 413, "invalid_request_error"),
    (BackendOverloaded("busy"), 429, "rate_limit_error"),
    (BackendUnavailable("down"), 503, "service_unavailable_error"),
    (BackendError("worker crashed"), 500, "server_error"),
    (ZeroDivisionError("x"), 500, "server_error"),
])
def test_error_reply_envelope(exc, status, type_):
    reply = error_reply(exc)
    assert reply.status_code == status
    assert set(reply.body) == {"error"}
    assert set(reply.body["error"]) == {"message", "type", "param", "code"}
    assert reply.body["error"]["type"] == type_
    if not isinstance(exc, ZeroDivisionError):
        assert reply.body["error"]["message"] == str(exc)
    assert reply.sse_event().startswith("data: {\"error\": ")


def test_malformed_json_message():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 12), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting ',' delimiter"}}])
    assert "Malformed JSON" in err.message and "12" in err.message and err.param is None


# -- the sampling controls -------------------------------------------------------------------


def test_sampling_controls_are_read():
    req = completion(presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"7": 5, "9": -100},
                     min_p=0.1, min_tokens=3, stop_token_ids=[4, 5], ignore_eos=True,
                     include_stop_str_in_output=True, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert req.logit_bias == {7: 5.0, 9: -100.0}
    assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty, req.min_p) == (0.5, -1.0, 1.2, 0.1)
    assert (req.min_tokens, req.stop_token_ids, req.ignore_eos) == (3, [4, 5], True)
    assert req.include_stop_str_in_output and not req.skip_special_tokens and not req.spaces_between_special_tokens


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0), ("repetition_penalty", -1.0),
    ("repetition_penalty", 1e-9), ("min_p", -0.1), ("min_p", 1.5), ("min_tokens", -1), ("stop_token_ids", [-1]),
    ("logit_bias", {"x": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"5": "1"}), ("logit_bias", [1]),
    ("ignore_eos", "yes"),
])
def test_sampling_controls_out_of_range(field, value):
    err = refusal(CompletionRequest, {"model": "m", "prompt": "x", field: value})
    assert err.param.split("[")[0] == field, err.message


@pytest.mark.parametrize("body,needle", [
    ({"continue_final_message": True}, "add_generation_prompt"),
    ({"continue_final_message": True, "add_generation_prompt": False}, "assistant"),
    ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
])
def test_chat_template_options_refused(body, needle):
    err = refusal(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    assert needle in err.message and err.param in ("continue_final_message", "chat_template_kwargs")


def test_assistant_prefill_is_accepted():
    req = chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "Sure,"}],
               continue_final_message=True, add_generation_prompt=False, chat_template_kwargs={"enable_thinking": False})
    assert req.continue_final_message and req.chat_template_kwargs == {"enable_thinking": False}
