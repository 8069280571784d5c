"""response_format and tools through the OpenAI SDK, on a fake backend that answers with a
tool call: what the server reads and how it streams it, what it sends the backend.
(test_structured_workers.py: the same against real workers.)"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.api.fake_backend import MARK_TOOL_CALL
from tests.api.helpers import assert_error

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 16}}, "required": ["tz"],
    "additionalProperties": False}}}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def accumulate(stream):
    """What an SDK user rebuilds from a stream: content, calls by index, the finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.fixture(scope="module")
def server_url(fake_server_url):
    """The server's side of tools and formats, on the fake backend (these tests steer it)."""
    return fake_server_url


@pytest.fixture(scope="module")
def model_name():
    from tests.api.conftest import TEST_MODEL_NAME

    return TEST_MODEL_NAME

def test_tool_calls_are_read_from_the_output(client, model_name):
    """A hermes-format answer becomes message.tool_calls and finish_reason tool_calls;
    the text before the calls stays the content."""
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": MARK_TOOL_CALL}],
                                       tools=[WEATHER, TIME], max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("function", "get_time", {"tz": "Europe/Paris"}),
    ]
    assert len({c.id for c in calls}) == 2

def test_tool_calls_stream_as_openai_streams_them(client, model_name):
    """Streamed: content deltas, then tool_calls deltas (index, id, type, name, arguments)
    that rebuild the same calls, and finish_reason tool_calls; no markup leaks into content."""
    stream = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": MARK_TOOL_CALL}],
                                            tools=[WEATHER, TIME], max_tokens=200, stream=True)
    content, calls, finish = accumulate(stream)
    assert content == "Let me look that up.\n" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris"})]
    assert all(c["id"].startswith("call_") for c in calls)

def test_without_tools_the_text_stays_text(client, model_name):
    """tool_choice 'none' (or no tools): the same answer is plain content."""
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": MARK_TOOL_CALL}],
                                       tools=[WEATHER], tool_choice="none", max_tokens=200)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert "<tool_call>" in r.choices[0].message.content

def test_history_with_tool_calls_and_tool_answers(client, model_name, app_engine, smollm_tokenizer):
    before = len(app_engine.requests)
    r = client.chat.completions.create(model=model_name, max_tokens=5, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "sunny, 21 degrees"},
    ])
    assert r.choices[0].message.role == "assistant"
    prompt = smollm_tokenizer.decode(app_engine.requests[before].prompt_ids)
    assert "<|im_start|>tool\nsunny, 21 degrees<|im_end|>" in prompt

@pytest.mark.parametrize("kwargs,schema", [
    ({"response_format": {"type": "json_object"}}, {"type": "object"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}, PERSON),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     WEATHER["function"]["parameters"]),
    ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, None),
    ({"tools": [WEATHER]}, "none"),
    ({"response_format": {"type": "text"}}, "none"),
])
def test_the_backend_gets_the_grammar(client, model_name, app_engine, app_settings, kwargs, schema):
    """What the workers are asked to constrain to: the schema, ending on the EOS tokens."""
    before = len(app_engine.requests)
    client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   **kwargs)
    grammar = app_engine.requests[before].sampling.grammar
    if schema == "none":
        assert grammar is None
        return
    assert grammar.kind == "json_schema" and grammar.stop_token_ids == app_settings.eos_token_ids
    sent = json.loads(grammar.source)
    if schema is None:  # required: an array of one call of a listed tool
        assert sent["type"] == "array" and sent["minItems"] == sent["maxItems"] == 1
        assert sent["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    else:
        assert sent == schema

def test_a_schema_the_grammar_cannot_take_is_a_400(http, model_name):
    r = http.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert "schema" in assert_error(r, 400, "response_format")["message"]
