"""Reading tool calls out of a model's text: pure functions, one parser per format.

- `hermes`: Qwen2.5 (and Hermes, SmolLM3...): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, text before the first block is the message's content.
- `llama3_json`: Llama 3.x: the whole output is `{"name": ..., "parameters": {...}}` (after an
  optional `<|python_tag|>`), several calls separated by `;`.
- `forced`: the output of a grammar-constrained request (tool_choice "required": a JSON array
  of {"name", "parameters"}; a named function: its arguments object), whatever the model's format.

`ToolCallStream` applies a parser to a streamed output: text that is surely content
goes out as it comes; from where a call may start it holds the text back, and at the
end parses it (text that turns out not to be a call is released as content).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from server.tokenization import StopStringMatcher

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text
    id: str = ""

    @staticmethod
    def of(name: Any, arguments: Any) -> "ParsedToolCall":
        if not isinstance(name, str) or not name:
            raise ValueError("a tool call needs a name")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise ValueError("tool call arguments must be an object")
        return ParsedToolCall(name, json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


Parsed = tuple[str | None, list[ParsedToolCall]]  # (content, calls)
Parser = Callable[[str], Parsed]


def _json_values(text: str) -> list[Any]:
    """Consecutive JSON values in text, separated by whitespace or ';' (ValueError otherwise)."""
    decoder = json.JSONDecoder()
    values, i = [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        value, i = decoder.raw_decode(text, i)
        values.append(value)


def parse_hermes(text: str) -> Parsed:
    """Qwen2.5's format. A block that does not parse leaves the whole text as content;
    an unterminated last block (the model stopped right after its JSON) is accepted."""
    start = text.find(HERMES_OPEN)
    if start < 0:
        return text, []
    calls, rest = [], text[start:]
    try:
        while rest:
            if not rest.startswith(HERMES_OPEN):
                raise ValueError("text between tool calls")
            end = rest.find(HERMES_CLOSE)
            body = rest[len(HERMES_OPEN): end if end >= 0 else len(rest)]
            (call,) = _json_values(body)
            calls.append(ParsedToolCall.of(call.get("name"), call.get("arguments", call.get("parameters"))))
            rest = rest[end + len(HERMES_CLOSE):].lstrip() if end >= 0 else ""
    except (ValueError, AttributeError):
        return text, []
    content = text[:start].rstrip()
    return content or None, calls


def parse_llama3_json(text: str) -> Parsed:
    """Llama 3's JSON format: the whole output is the calls, or it is content."""
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    if not body.lstrip().startswith("{"):
        return text, []
    try:
        calls = [ParsedToolCall.of(v.get("name"), v.get("parameters", v.get("arguments"))) for v in _json_values(body)]
    except (ValueError, AttributeError):
        return text, []
    return None, calls


def parse_forced(text: str, function: str | None) -> Parsed:
    """The output of a grammar-forced call: `function` named: its arguments object;
    None ('required'): an array of {"name", "parameters"}."""
    try:
        value = json.loads(text)
        if function is not None:
            return None, [ParsedToolCall.of(function, value)]
        return None, [ParsedToolCall.of(v.get("name"), v.get("parameters")) for v in value]
    except (ValueError, AttributeError, TypeError):
        return text, []  # cut short (max_tokens): not a call


@dataclass(frozen=True)
class ToolFormat:
    name: str
    parse: Parser
    # (output so far, how much went out as content) -> (where a call may start, whether one surely did)
    starts: Callable[[str, int], tuple[int, bool]]


def _hermes_start(text: str, sent: int) -> tuple[int, bool]:
    at = text.find(HERMES_OPEN, sent)
    if at >= 0:
        return at, True
    return len(text) - StopStringMatcher._partial_suffix(text, HERMES_OPEN), False


def _llama3_start(text: str, sent: int) -> tuple[int, bool]:
    """A Llama 3 call is the whole output: once content went out, none can come."""
    body = text.lstrip()
    if sent or (body and not body.startswith(("{", PYTHON_TAG)) and not PYTHON_TAG.startswith(body)):
        return len(text), False
    return 0, body.startswith(("{", PYTHON_TAG))


FORMATS = {
    "hermes": ToolFormat("hermes", parse_hermes, _hermes_start),
    "llama3_json": ToolFormat("llama3_json", parse_llama3_json, _llama3_start),
}


def forced_format(function: str | None) -> ToolFormat:
    """A grammar-forced call (see parse_forced): the whole output is the call."""
    return ToolFormat("forced", lambda text: parse_forced(text, function), lambda text, sent: (0, True))


def format_for_template(chat_template: str | None) -> ToolFormat:
    """The format a chat template teaches its model (hermes when it says nothing)."""
    template = chat_template or ""
    if HERMES_OPEN not in template and (PYTHON_TAG in template or "ipython" in template):
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


class ToolCallStream:
    """One choice's streamed text, split into content to send now and the calls at the end."""

    def __init__(self, tool_format: ToolFormat):
        self._format = tool_format
        self._text = ""
        self._sent = 0  # text[:sent] went out as content
        self._held = False  # a call surely started at text[sent:]: hold everything from there

    def feed(self, text: str) -> str:
        """Add output text; returns the part that is surely content."""
        self._text += text
        if self._held:
            return ""
        start, self._held = self._format.starts(self._text, self._sent)
        start = max(start, self._sent)
        out, self._sent = self._text[self._sent:start], start
        return out

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """At the end: (content still to send, the calls)."""
        content, calls = self._format.parse(self._text)
        rest = (content or "")[self._sent:] if calls else self._text[self._sent:]
        self._sent = len(self._text)
        return rest, calls
