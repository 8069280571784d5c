"""Tool calls read from model-style texts (server/tool_calls.py): pure functions, no server."""

from __future__ import annotations

import json

import pytest

from server.tool_calls import (
    FORMATS,
    ToolCallStream,
    forced_format,
    format_for_template,
    parse_forced,
    parse_hermes,
    parse_llama3_json,
)


def calls_of(parsed):
    content, calls = parsed
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


QWEN_TWO_CALLS = (
    "Let me check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n"
    "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Europe/Paris\", \"24h\": true}}\n</tool_call>"
)


def test_hermes_calls_and_leading_content():
    assert calls_of(parse_hermes(QWEN_TWO_CALLS)) == (
        "Let me check both.",
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "24h": True})],
    )
    content, calls = parse_hermes(QWEN_TWO_CALLS)
    assert calls[0].id.startswith("call_") and calls[0].id != calls[1].id


def test_hermes_edge_cases():
    """Unterminated last block (EOS right after the JSON) is a call; a broken block,
    a name that is no string or plain text leave the text as content (no call invented)."""
    assert calls_of(parse_hermes('<tool_call>\n{"name": "f", "arguments": {}}')) == (None, [("f", {})])
    assert calls_of(parse_hermes('<tool_call>{"name": "f"}</tool_call>')) == (None, [("f", {})])
    for text in ('<tool_call>\n{"name": "f", "arguments": {"a": </tool_call>',
                 '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
                 '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                 "just text, no call"):
        assert calls_of(parse_hermes(text)) == (text, [])


def test_llama3_json_calls():
    assert calls_of(parse_llama3_json('{"name": "get_weather", "parameters": {"city": "Oslo"}}')) == (
        None, [("get_weather", {"city": "Oslo"})])
    two = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    assert calls_of(parse_llama3_json(two)) == (None, [("a", {"x": 1}), ("b", {})])
    for text in ("The weather is fine.", '{"name": "a", "parameters": {"x": 1}} and then text', '{"no": "name"}'):
        assert calls_of(parse_llama3_json(text)) == (text, [])


def test_forced_outputs():
    assert calls_of(parse_forced('{"city": "Rome"}', "get_weather")) == (None, [("get_weather", {"city": "Rome"})])
    required = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    assert calls_of(parse_forced(required, None)) == (None, [("a", {"x": 1}), ("b", {})])
    assert calls_of(parse_forced('[{"name": "a", "param', None)) == ('[{"name": "a", "param', [])  # cut short


def test_format_follows_the_chat_template():
    assert format_for_template("... <tool_call>\\n{{ tool_call | tojson }} ...").name == "hermes"
    assert format_for_template("{%- if tools %}<|start_header_id|>ipython<|end_header_id|>").name == "llama3_json"
    assert format_for_template(None).name == "hermes"


def stream(tool_format, pieces):
    s = ToolCallStream(tool_format)
    sent = [s.feed(p) for p in pieces]
    rest, calls = s.finish()
    return sent, rest, [(c.name, json.loads(c.arguments)) for c in calls]


def test_stream_sends_content_and_holds_calls():
    """Content before a call streams as it comes; a marker split over pieces is held, never
    sent as content; the calls come at the end; the content sent equals the whole-text content."""
    pieces = ["Let me ", "check both.\n<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Paris\"}}",
              "\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Europe/Paris\", \"24h\": true}}",
              "\n</tool_call>"]
    assert "".join(pieces) == QWEN_TWO_CALLS
    sent, rest, calls = stream(FORMATS["hermes"], pieces)
    assert sent == ["Let me ", "check both.\n", "", "", "", ""]
    assert "".join(sent) + rest == "Let me check both.\n" and rest == ""
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "24h": True})]


@pytest.mark.parametrize("pieces", [["Hello <to", "day> is fine"], ["<tool_call> not json", " at all"], ["plain"]])
def test_stream_without_calls_sends_everything(pieces):
    sent, rest, calls = stream(FORMATS["hermes"], pieces)
    assert "".join(sent) + rest == "".join(pieces) and calls == []


def test_stream_llama3_and_forced():
    sent, rest, calls = stream(FORMATS["llama3_json"], ['  {"name": "a", ', '"parameters": {"x": 1}}'])
    assert sent == ["", ""] and rest == "" and calls == [("a", {"x": 1})]
    sent, rest, calls = stream(FORMATS["llama3_json"], ["Sure", ", {here}"])
    assert "".join(sent) + rest == "Sure, {here}" and calls == []
    sent, rest, calls = stream(forced_format("f"), ['{"x"', ": 2}"])
    assert sent == ["", ""] and rest == "" and calls == [("f", {"x": 2})]
