"""A request's Grammar (protocol.messages) compiled for llguidance: torch-free, so the
HTTP process refuses a bad schema with a 400 before anything reaches a worker, and
the workers compile exactly what the server checked (workers/sampling/grammar.py)."""

from __future__ import annotations

import json
from functools import lru_cache

from protocol.messages import Grammar

# Compact JSON: no free whitespace (a model cannot pad forever), OpenAI's separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar that cannot be compiled, or a token it does not allow."""


def compile_grammar(grammar: Grammar) -> str:
    """The llguidance grammar of a Grammar message; raises GrammarError."""
    import llguidance

    if grammar.kind != "json_schema":
        raise GrammarError(f"unknown grammar kind {grammar.kind!r}")
    try:
        schema = json.loads(grammar.source)
        compiled = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid JSON schema: {exc}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
    if is_error:
        raise GrammarError(f"unsupported JSON schema: {messages[0] if messages else 'invalid'}")
    return compiled


@lru_cache(maxsize=64)
def compiled_grammar(grammar: Grammar) -> str:
    """compile_grammar, remembered (a worker sees the same schema again and again)."""
    return compile_grammar(grammar)
