"""POST /v1/completions: prompts (text or token ids) x n choices."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Sequence

from fastapi import Request
from fastapi.responses import Response

from server.api import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
)
from server.errors import InvalidRequest
from server import serving
from server.serving import ChoiceDelta, ChoicesView, ChoiceState, ServerContext, TokenInfo
from server.tokenization import decode_prompt, encode_prompt


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what echo returns


def completion_logprobs(tokens: Sequence[TokenInfo], start_offset: int) -> CompletionLogprobs:
    """OpenAI's legacy format; top_logprobs always holds the chosen token too. A token
    without a logprob (the first of an echoed prompt) has None for both, as in vLLM."""
    offsets, offset = [], start_offset
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    tops: list[dict[str, float] | None] = []
    for t in tokens:
        if t.logprob is None:
            tops.append(None)
            continue
        top = {a.token: a.logprob for a in t.top}
        top[t.token] = t.logprob  # the chosen token is always there, with its own logprob
        tops.append(top)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=tops,
        text_offset=offsets,
    )


class CompletionServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    async def create(self, req: CompletionRequest, request: Request) -> Response:
        ctx = self.ctx
        serving.check_request(ctx, req)
        prompts = await self._prompts(req)
        max_tokens = [serving.resolve_max_tokens(ctx, len(p.ids), req.max_tokens, "prompt") for p in prompts]
        serving.check_min_tokens(req, min(max_tokens))
        serving.check_capacity(ctx, len(prompts) * req.n, "n" if req.n > 1 else "prompt")
        request_id = f"cmpl-{uuid.uuid4().hex}"
        seed = serving.base_seed(req)
        choices = []
        for p, prompt in enumerate(prompts):
            choices += serving.prompt_choices(ctx, req, request_id, p * req.n, prompt.ids, max_tokens[p], seed,
                                      num_logprobs=req.logprobs, prompt_logprobs=req.prompt_logprobs)
        view = _CompletionView(request_id, int(time.time()), ctx.settings.model_name, req, prompts, choices)
        return await serving.answer(ctx, choices, view, request, stream=req.stream)

    async def _prompts(self, req: CompletionRequest) -> list[Prompt]:
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)) or raw == []:
            raw = [raw]
        prompts = []
        for item in raw:
            if isinstance(item, str):
                if item == "":
                    raise InvalidRequest("the prompt is empty", param="prompt")
                ids = await serving.tokenize(self.ctx, len(item), encode_prompt, self.ctx.tokenizer, item)
                prompts.append(Prompt(ids, item))
            else:
                serving.check_token_ids(self.ctx, item, "prompt")
                text = ""
                if req.echo:
                    text = await serving.tokenize(self.ctx, len(item), decode_prompt, self.ctx.tokenizer, item)
                prompts.append(Prompt(list(item), text))
        return prompts


class _CompletionView(ChoicesView):

    def __init__(self, request_id: str, created: int, model: str, req: CompletionRequest,
                 prompts: list[Prompt], choices: list[ChoiceState]):
        self._id, self._created, self._model = request_id, created, model
        self._n = req.n
        self._echo = req.echo
        self._prompts = prompts
        self._choices = choices
        self._offsets = {c.index: 0 for c in choices}  # text_offset of the next streamed token
        self.include_usage = req.include_usage

    def _prompt_of(self, index: int) -> Prompt:
        return self._prompts[index // self._n]

    def _chunk(self, choices: list[CompletionChoice]) -> CompletionChunk:
        return CompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices)

    def _echoed_logprobs(self, choice: ChoiceState) -> list[TokenInfo]:
        """The prompt's tokens that lead the logprobs under echo (none otherwise)."""
        if not (self._echo and choice.wants_logprobs):
            return []
        return choice.prompt_tokens or []

    def opening(self) -> list[CompletionChunk]:
        if not self._echo:
            return []
        chunks = []
        for c in self._choices:  # the first output of every choice is in: prompt logprobs are known
            logprobs = None
            if c.wants_logprobs:
                prompt_tokens = self._echoed_logprobs(c)
                logprobs = completion_logprobs(prompt_tokens, 0)
                self._offsets[c.index] = sum(len(t.token) for t in prompt_tokens)
            chunks.append(self._chunk([CompletionChoice(index=c.index, text=self._prompt_of(c.index).text,
                                                        logprobs=logprobs)]))
        return chunks

    def chunk(self, delta: ChoiceDelta) -> CompletionChunk | None:
        if not delta.text and not delta.tokens and delta.finish_reason is None:
            return None
        logprobs = None
        if delta.tokens is not None:
            logprobs = completion_logprobs(delta.tokens, self._offsets[delta.index])
            self._offsets[delta.index] += sum(len(t.token) for t in delta.tokens)
        return self._chunk([CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs,
                                             finish_reason=delta.finish_reason)])

    def empty_chunk(self) -> CompletionChunk:
        return self._chunk([])

    def usage_info(self) -> UsageInfo:
        return serving.usage([len(p.ids) for p in self._prompts], self._choices)

    def response(self) -> CompletionResponse:
        choices = []
        for c in self._choices:
            prefix = self._prompt_of(c.index).text if self._echo else ""
            logprobs = completion_logprobs(self._echoed_logprobs(c) + c.tokens, 0) if c.wants_logprobs else None
            choices.append(CompletionChoice(index=c.index, text=prefix + c.text, logprobs=logprobs,
                                            finish_reason=c.finish_reason))
        return CompletionResponse(id=self._id, created=self._created, model=self._model, choices=choices,
                                  usage=self.usage_info(), speculation=serving.speculation(self._choices))
