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
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)
from server.serving import (
    ChoiceDelta,
    ChoicesView,
    ChoiceState,
    ServerContext,
    TokenInfo,
    answer,
    base_seed,
    check_capacity,
    check_generation_limits,
    check_min_tokens,
    check_model,
    new_choice,
    resolve_max_tokens,
    sampling_params,
    speculation,
    tokenize,
    usage,
)
from server.tokenization import render_chat


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
        check_model(ctx, req.model)
        check_generation_limits(ctx, req)
        messages = [m.for_template() for m in req.messages]
        num_chars = sum(len(m["content"]) for m in messages)
        prompt_ids = await tokenize(ctx, num_chars, partial(
            render_chat, add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message, template_kwargs=req.chat_template_kwargs,
        ), ctx.tokenizer, messages)
        max_tokens = resolve_max_tokens(ctx, len(prompt_ids), req.completion_limit, "messages")
        check_min_tokens(req, max_tokens)
        check_capacity(ctx, req.n, "n")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        seed = base_seed(req)
        choices = [
            new_choice(ctx, i, f"{request_id}-{i}", prompt_ids, max_tokens, sampling_params(req, i, seed),
                       req, req.num_logprobs)
            for i in range(req.n)
        ]
        view = _ChatView(request_id, int(time.time()), ctx.settings.model_name, req.include_usage,
                         len(prompt_ids), choices)
        return await answer(ctx, choices, view, request, stream=req.stream)


class _ChatView(ChoicesView):

    def __init__(self, request_id: str, created: int, model: str, include_usage: bool, num_prompt: int,
                 choices: list[ChoiceState]):
        self._id, self._created, self._model = request_id, created, model
        self._num_prompt = num_prompt
        self._choices = choices
        self.include_usage = include_usage

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices)

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))])
                for c in self._choices]

    def chunk(self, delta: ChoiceDelta) -> ChatCompletionChunk | None:
        if not delta.text and not delta.tokens and delta.finish_reason is None:
            return None
        logprobs = chat_logprobs(delta.tokens) if delta.tokens is not None else None
        return self._chunk([ChatChunkChoice(index=delta.index, delta=DeltaMessage(content=delta.text or None),
                                            logprobs=logprobs, finish_reason=delta.finish_reason)])

    def empty_chunk(self) -> ChatCompletionChunk:
        return self._chunk([])

    def usage_info(self) -> UsageInfo:
        return usage([self._num_prompt], self._choices)

    def response(self) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=chat_logprobs(c.tokens) if c.wants_logprobs else None,
                finish_reason=c.finish_reason,
            )
            for c in self._choices
        ]
        return ChatCompletionResponse(id=self._id, created=self._created, model=self._model, choices=choices,
                                      usage=self.usage_info(), speculation=speculation(self._choices))
