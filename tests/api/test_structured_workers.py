"""response_format and tools through the OpenAI SDK on real workers (mode sd, the tiny
random model): it writes JSON only because of the grammar, so what parses and validates
here was constrained in the draft and the target."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.api.test_structured import PERSON, TIME, WEATHER, accumulate


@pytest.fixture(scope="module")
def server_url(launched_server_url):
    return launched_server_url


@pytest.fixture(scope="module")
def model_name(server_url):
    import httpx

    return httpx.get(f"{server_url}/v1/models").json()["data"][0]["id"]


def test_response_format_json_schema_validates(client, model_name):
    """Non-streamed and streamed (greedy: the same text), the content parses and validates;
    an unconstrained draft would be rejected almost always (the random model writes no JSON)."""
    kwargs = dict(model=model_name, messages=[{"role": "user", "content": "A person, please."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
                  max_tokens=120, temperature=0)
    r = client.chat.completions.create(**kwargs)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    spec = r.model_extra["speculation"]  # the draft worker masks too: its drafts are mostly accepted
    assert spec["num_draft_tokens"] > 0 and spec["num_accepted_tokens"] / spec["num_draft_tokens"] > 0.5
    content, calls, finish = accumulate(client.chat.completions.create(**kwargs, stream=True))
    assert content == r.choices[0].message.content and finish == "stop" and calls == []
    plain = client.chat.completions.create(**{**kwargs, "response_format": None, "max_tokens": 40})
    with pytest.raises(ValueError):  # the test has power: the model writes no JSON by itself
        json.loads(plain.choices[0].message.content)

def test_tool_choice_required_makes_valid_calls(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Weather?"}],
                                       tools=[WEATHER, TIME], tool_choice="required", max_tokens=150, seed=4,
                                       temperature=0.8)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])

def test_named_tool_choice_streamed(client, model_name):
    stream = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100, stream=True)
    content, calls, finish = accumulate(stream)
    assert finish == "tool_calls" and content == "" and [c["name"] for c in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME["function"]["parameters"])
