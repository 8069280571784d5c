"""POST /v1/chat/completions: messages through the chat template, n choices."""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Sequence

from fastapi import Request
from fastapi.responses import Response

from server.api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from server import serving
from server.serving import ChoiceDelta, ChoicesView, ChoiceState, ServerContext, TokenInfo
from server.structured import request_grammar
from server.tokenization import render_chat
from server.tool_calls import ParsedToolCall, ToolCallStream, ToolFormat, forced_format, format_for_template


def chat_logprobs(tokens: Sequence[TokenInfo]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprob(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.bytes),
            top_logprobs=[TopLogprob(token=a.token, logprob=a.logprob, bytes=list(a.bytes)) for a in t.top],
        )
        for t in tokens
    ])


class ChatServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, request: Request) -> Response:
        ctx = self.ctx
        serving.check_request(ctx, req)
        messages = [m.for_template() for m in req.messages]
        num_chars = sum(len(m["content"]) for m in messages)
        tool_choice = req.effective_tool_choice
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and tool_choice != "none" else None
        prompt_ids = await serving.tokenize(ctx, num_chars, partial(
            render_chat, tools=tools, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs,
        ), ctx.tokenizer, messages)
        max_tokens = serving.resolve_max_tokens(ctx, len(prompt_ids), req.completion_limit, "messages")
        serving.check_min_tokens(req, max_tokens)
        grammar = request_grammar(req, ctx.settings.eos_token_ids)
        serving.check_capacity(ctx, req.n, "n")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = serving.prompt_choices(ctx, req, request_id, 0, prompt_ids, max_tokens, serving.base_seed(req),
                                 num_logprobs=req.num_logprobs, grammar=grammar)
        view = _ChatView(request_id, int(time.time()), ctx.settings.model_name, req.include_usage,
                         len(prompt_ids), choices, _tool_format(ctx, tool_choice, tools))
        return await serving.answer(ctx, choices, view, request, stream=req.stream)


def _tool_format(ctx: ServerContext, tool_choice, tools) -> ToolFormat | None:
    """How this request's tool calls are read from the output (None: they are not)."""
    if isinstance(tool_choice, NamedToolChoice):
        return forced_format(tool_choice.function.name)
    if tool_choice == "required":
        return forced_format(None)
    if tools:
        return format_for_template(getattr(ctx.tokenizer, "chat_template", None))
    return None


def _delta_tool_calls(calls: list[ParsedToolCall]) -> list[DeltaToolCall] | None:
    """A stream sends each call whole: its first (and only) piece has id, name and all arguments."""
    return [DeltaToolCall(index=i, id=c.id, type="function",
                          function=DeltaFunctionCall(name=c.name, arguments=c.arguments))
            for i, c in enumerate(calls)] or None


class _ChatView(ChoicesView):

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, num_prompt: int,
                 choices: list[ChoiceState], tool_format: ToolFormat | None = None):
        self._id, self._created, self._model = request_id, created, model
        self._num_prompt = num_prompt
        self._choices = choices
        self.include_usage = include_usage
        self._tool_format = tool_format
        self._tool_streams = {c.index: ToolCallStream(tool_format) for c in choices} if tool_format else {}

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices)

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
                for c in self._choices]

    def chunk(self, delta: ChoiceDelta) -> ChatCompletionChunk | None:
        text, calls, finish_reason = delta.text, [], delta.finish_reason
        stream = self._tool_streams.get(delta.index)
        if stream is not None:
            text = stream.feed(delta.text)
            if finish_reason is not None:
                rest, calls = stream.finish()
                text += rest
                finish_reason = "tool_calls" if calls else finish_reason
        if not text and not delta.tokens and finish_reason is None:
            return None
        logprobs = chat_logprobs(delta.tokens) if delta.tokens is not None else None
        message = DeltaMessage(content=text or None, tool_calls=_delta_tool_calls(calls))
        return self._chunk([ChatChunkChoice(index=delta.index, delta=message, logprobs=logprobs,
                                            finish_reason=finish_reason)])

    def empty_chunk(self) -> ChatCompletionChunk:
        return self._chunk([])

    def usage_info(self) -> UsageInfo:
        return serving.usage([self._num_prompt], self._choices)

    def response(self) -> ChatCompletionResponse:
        choices = []
        for c in self._choices:
            content, calls = self._tool_format.parse(c.text) if self._tool_format else (c.text, [])
            tool_calls = [ResponseToolCall(id=t.id, function=ResponseFunctionCall(name=t.name, arguments=t.arguments))
                          for t in calls]
            choices.append(ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=content, tool_calls=tool_calls or None),
                logprobs=chat_logprobs(c.tokens) if c.wants_logprobs else None,
                finish_reason="tool_calls" if calls else c.finish_reason,
            ))
        return ChatCompletionResponse(id=self._id, created=self._created, model=self._model, choices=choices,
                                      usage=self.usage_info(), speculation=serving.speculation(self._choices))
