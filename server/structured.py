"""What a chat request's output must match: response_format and a forced tool_choice
as a Grammar (a JSON schema) for the workers, checked here (a bad schema is a 400)."""

from __future__ import annotations

import json
from typing import Any, Sequence

from protocol.grammars import GrammarError, compile_grammar
from protocol.messages import Grammar
from server.api import ChatCompletionRequest, NamedToolChoice, ResponseFormat, Tool
from server.errors import InvalidRequest

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def response_format_schema(fmt: ResponseFormat | None) -> dict[str, Any] | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ANY_OBJECT
    return fmt.json_schema.json_schema if fmt.json_schema.json_schema is not None else ANY_OBJECT


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else ANY_OBJECT


def tool_choice_schema(tools: Sequence[Tool], choice: str | NamedToolChoice, parallel: bool | None):
    """'required': an array of calls {"name", "parameters"} (one when parallel_tool_calls is
    false); a named function: its arguments object (as vLLM does). Otherwise None."""
    if isinstance(choice, NamedToolChoice):
        return next(_parameters(t) for t in tools if t.function.name == choice.function.name)
    if choice != "required":
        return None
    call = {"anyOf": [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]}
    schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def request_grammar(req: ChatCompletionRequest, stop_token_ids: Sequence[int]) -> Grammar | None:
    """The request's grammar, compiled once here so a bad schema is refused before generation."""
    schema = tool_choice_schema(req.tools or (), req.effective_tool_choice, req.parallel_tool_calls)
    param = "tools"
    if schema is None:
        schema, param = response_format_schema(req.response_format), "response_format"
    if schema is None:
        return None
    grammar = Grammar("json_schema", json.dumps(schema), tuple(stop_token_ids))
    try:
        compile_grammar(grammar)
    except GrammarError as exc:
        raise InvalidRequest(f"Invalid value for '{param}': {exc}", param=param) from None
    return grammar
