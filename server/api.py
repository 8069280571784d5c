"""OpenAI-shaped request and response schemas (pydantic).

Requests are strict (no "1" for 1) and closed (an unknown field is an error),
`null` means "the default" as in OpenAI's API, and a parameter we do not
implement is refused unless it holds its neutral value. Limits that depend on
the deployment (max_n, stop count, context length, vocabulary) are checked in
serving, not here.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

PromptInput = Union[str, list[str], list[int], list[list[int]]]


# -- helpers ---------------------------------------------------------------------


def _only(*allowed: Any, hint: str = ""):
    """A parameter we accept only at its neutral value(s); anything else is a 400 naming it."""
    shown = " or ".join(repr(a) if a is not None else "null" for a in allowed)

    def check(value: Any, info: ValidationInfo) -> Any:
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise PydanticCustomError(
            "unsupported_parameter",
            "Unsupported parameter '{name}': this server does not implement it "
            "(only " + shown + " is accepted)" + hint,
            {"name": info.field_name},
        )

    return AfterValidator(check)


def _invalid(message: str, param: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_parameter", message, {"param": param})


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(t) is int for t in value)


def _prompt(value: Any) -> PromptInput:
    """str | list[str] | list[int] | list[list[int]], with a message that says so."""
    if isinstance(value, str) or _is_token_list(value):
        return value
    if isinstance(value, list) and value and (
        all(isinstance(p, str) for p in value) or all(_is_token_list(p) for p in value)
    ):
        return value
    raise PydanticCustomError(
        "invalid_parameter",
        "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
        {"param": "prompt"},
    )


def _stop(value: Any) -> list[str]:
    """str | list[str] -> list[str]; empty strings are refused (they would match at once)."""
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _invalid("'stop' must be a string or a list of strings", "stop")
    if any(s == "" for s in stops):
        raise _invalid("'stop' strings must not be empty", "stop")
    return stops


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias: [-100, 100]


def _logit_bias(value: Any) -> dict[int, float]:
    """{"token id": bias} -> {id: bias}; ids must be integers (the vocabulary is checked in serving)."""
    if not isinstance(value, dict):
        raise _invalid("'logit_bias' must be an object mapping token ids (as strings) to biases", "logit_bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise _invalid(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise _invalid(f"'logit_bias' values must be numbers, got {bias!r} for token {key}", "logit_bias")
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise _invalid(
                f"'logit_bias' values must be in [-100, 100], got {bias} for token {key}", "logit_bias"
            )
        out[token] = float(bias)
    return out


def _message_content(value: Any) -> str:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict):
                raise PydanticCustomError("invalid_parameter", "content parts must be objects")
            if part.get("type") != "text":
                raise PydanticCustomError(
                    "unsupported_parameter",
                    "only text content parts are supported (got type '{kind}')",
                    {"kind": str(part.get("type"))},
                )
            if set(part) - {"type", "text"} or not isinstance(part.get("text"), str):
                raise PydanticCustomError(
                    "invalid_parameter", 'a text content part is {"type": "text", "text": str}'
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise PydanticCustomError("invalid_parameter", "content must be a string or a list of text parts")


def _lone_surrogate_path(data: Any) -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (JSON lets
    "\\ud800" through; it is not Unicode, and no tokenizer or encoder takes it).
    Iterative: the body may be nested as deep as the JSON parser allows."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, path or "body"))
                stack.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
    return None


def _refuse_lone_surrogates(data: Any) -> Any:
    path = _lone_surrogate_path(data)
    if path is not None:
        raise _invalid(
            f"Invalid value for '{path}': the string holds a lone UTF-16 surrogate "
            "(an escape such as \\ud800 without its pair), which is not valid Unicode",
            path,
        )
    return data


# -- requests ----------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: Annotated[bool, _only(False, hint="; no obfuscation padding is sent")] = False


class SpeculationControl(_Request):
    """Tandem's extension field `speculation` (OpenAI SDK: extra_body): this request's
    most drafts per round, 0 for none (the target alone), capped by the server's."""

    num_draft_tokens: int = Field(ge=0, le=64)


class BaseGenerationRequest(_Request):
    """The sampling and streaming parameters shared by both endpoints."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return _refuse_lone_surrogates(data)

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="0 or -1: off (extension)")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Annotated[list[str], PlainValidator(_stop, json_schema_input_type=Union[str, list[str]])] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, not used
    # the sampling controls (vLLM's meanings; workers/sampling/processors.py)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # vLLM takes any r > 0; below 0.01 a positive logit divided by r can overflow to inf
    repetition_penalty: float = Field(1.0, ge=0.01, le=100.0, description="vLLM extension; 1 is off")
    logit_bias: Annotated[
        dict[int, float], PlainValidator(_logit_bias, json_schema_input_type=dict[str, float])
    ] = {}
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = []
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    speculation: SpeculationControl | None = None  # extension: per-request speculation control

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise _invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def num_draft_tokens(self) -> int | None:
        """The request's cap on drafts per round (None: the server's)."""
        return None if self.speculation is None else self.speculation.num_draft_tokens


class CompletionRequest(BaseGenerationRequest):
    prompt: Annotated[PromptInput, PlainValidator(_prompt, json_schema_input_type=PromptInput)]
    max_tokens: int = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    best_of: int | None = Field(None, ge=1)
    suffix: Annotated[str, _only("")] = ""

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.best_of is not None and self.best_of != self.n:
            raise _invalid(
                f"Unsupported parameter 'best_of': only best_of == n ({self.n}) is supported", "best_of"
            )
        if self.max_tokens == 0 and not self.echo:
            raise _invalid("'max_tokens' may be 0 only with 'echo' (the prompt is all the answer)", "max_tokens")
        return self

    @property
    def prompt_logprobs(self) -> int | None:
        """echo with logprobs: the prompt's tokens get logprobs too (top N of each). The
        workers need the prompt scored to answer max_tokens 0 at all (then top 0)."""
        if not self.echo or (self.logprobs is None and self.max_tokens > 0):
            return None
        return self.logprobs or 0


# apply_chat_template's own arguments: set through the request's fields, never chat_template_kwargs
_TEMPLATE_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: bool | None = None  # accepted; tool_choice "required" or a named function constrains anyway


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # accepted; the output is constrained to the schema either way


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "invalid_parameter", "'json_schema' is required with (and only with) type 'json_schema'")
        return self


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str, PlainValidator(_message_content, json_schema_input_type=Union[str, list[dict[str, str]]])
    ]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        """An assistant message with tool_calls may leave out 'content' (or send null)."""
        if isinstance(data, dict) and data.get("role") == "assistant" and data.get("tool_calls") \
                and data.get("content") is None:
            return {**data, "content": ""}
        return data

    @model_validator(mode="after")
    def _fields_by_role(self):
        # no param: the error names the message (messages[i])
        if self.tool_calls is not None and self.role != "assistant":
            raise PydanticCustomError("invalid_parameter", "only assistant messages have 'tool_calls'")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise PydanticCustomError(
                "invalid_parameter", "a 'tool' message needs 'tool_call_id' (and only it has one)")
        return self

    def for_template(self) -> dict[str, Any]:
        """The dict a chat template sees ('developer' is OpenAI's newer name for 'system');
        tool-call arguments as objects, as templates (Qwen2.5's, Llama 3's) expect them."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name,
                                                          "arguments": _arguments_object(c.function.arguments)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _tool_choice(value: Any) -> str | NamedToolChoice:
    """'none' | 'auto' | 'required' | {"type": "function", "function": {"name": ...}}, with a message that says so."""
    if value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        try:
            return NamedToolChoice.model_validate(value)
        except ValueError:
            pass
    raise _invalid("'tool_choice' must be 'none', 'auto', 'required' or "
                   '{"type": "function", "function": {"name": ...}}', "tool_choice")


class ChatCompletionRequest(BaseGenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Annotated[
        str | NamedToolChoice | None,
        PlainValidator(_tool_choice, json_schema_input_type=Union[Literal["none", "auto", "required"], dict[str, Any]]),
    ] = None
    functions: Annotated[list[Any] | None, _only(None, [])] = None
    function_call: Annotated[Any, _only(None, "none")] = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None  # False: tool_choice "required" makes exactly one call
    store: Annotated[bool, _only(False)] = False
    # the chat template (vLLM's extensions)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise _invalid(
                "'continue_final_message' continues the last assistant message: set 'add_generation_prompt' "
                "to false with it",
                "continue_final_message",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise _invalid(
                "'continue_final_message' needs the last message to be the assistant's (the prefill)",
                "continue_final_message",
            )
        reserved = sorted(_TEMPLATE_ARGUMENTS & set(self.chat_template_kwargs))
        if reserved:
            raise _invalid(
                f"'chat_template_kwargs' must not set '{reserved[0]}' (use the request's own fields)",
                "chat_template_kwargs",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise _invalid("'tool_choice' other than 'none' or 'auto' requires 'tools'", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
            t.function.name for t in self.tools or ()
        }:
            raise _invalid(f"'tool_choice' names the function '{self.tool_choice.function.name}', "
                           "which is not among 'tools'", "tool_choice")
        if self.forced_tool_choice and self.response_format is not None and self.response_format.type != "text":
            raise _invalid("'response_format' cannot constrain the output when 'tool_choice' forces a tool call",
                           "response_format")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise _invalid(
                "'max_tokens' and 'max_completion_tokens' disagree; give only one", "max_completion_tokens"
            )
        return self

    @property
    def completion_limit(self) -> int | None:
        """The requested maximum of generated tokens; None: the rest of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: 'auto' when tools are given, else 'none'."""
        if self.tool_choice is None:
            return "auto" if self.tools else "none"
        return self.tool_choice

    @property
    def forced_tool_choice(self) -> bool:
        """'required' or a named function: the output is a tool call, by grammar."""
        return self.effective_tool_choice not in ("none", "auto")


# -- responses -----------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculationInfo(BaseModel):
    """Tandem's extra field on non-streaming responses (sums over choices)."""

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_target_passes: int = 0


class _OmitUnset(BaseModel):
    """A streamed piece: fields left at None are not sent (OpenAI's deltas)."""

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class _Envelope(BaseModel):
    """What every completion response and chunk starts with; `object` names the kind."""

    id: str
    object: str
    created: int
    model: str


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token under echo
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo
    speculation: SpeculationInfo


class CompletionChunk(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_made(self, handler):
        out = handler(self)
        if out.get("tool_calls") is None:
            out.pop("tool_calls", None)
        return out


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo
    speculation: SpeculationInfo


class DeltaFunctionCall(_OmitUnset):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitUnset):
    """A piece of a streamed tool call: the first piece of call `index` has its id,
    type and name; arguments arrive as text to concatenate."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_OmitUnset):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer endpoints (vLLM's shapes) ------------------------------------------------


class _TextRequest(_Request):
    """A request whose strings reach the tokenizer: no lone surrogates."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return _refuse_lone_surrogates(data)


class TokenizeCompletionRequest(_TextRequest):
    """POST /tokenize with a prompt: the ids a completion of it would see."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_TextRequest):
    """POST /tokenize with messages: the ids the chat template gives them."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: Annotated[bool, _only(True)] = True
    continue_final_message: Annotated[bool, _only(False)] = False
    add_special_tokens: Annotated[bool, _only(False, hint="; the chat template writes them")] = False
    return_token_strs: bool = False


TokenizeRequest = Union[TokenizeCompletionRequest, TokenizeChatRequest]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
