"""POST /tokenize and POST /detokenize (vLLM's shapes), GET /version."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.api import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from server.serving import ServerContext, check_model, check_token_ids, tokenize
from server.tokenization import decode_prompt, render_chat


def tandem_version() -> str:
    try:
        return metadata.version("tandem")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class TokenServing:
    def __init__(self, ctx: ServerContext):
        self.ctx = ctx

    async def tokenize(self, body: dict[str, Any]) -> TokenizeResponse:
        """A body with `messages` goes through the chat template; one with `prompt` is encoded as a completion's."""
        ctx = self.ctx
        if isinstance(body, dict) and "messages" in body:
            chat = _validate(TokenizeChatRequest, body)
            self._check_model(chat.model)
            messages = [m.for_template() for m in chat.messages]
            ids = await tokenize(ctx, sum(len(m["content"]) for m in messages), render_chat, ctx.tokenizer, messages)
            want_strs = chat.return_token_strs
        else:
            plain = _validate(TokenizeCompletionRequest, body)
            self._check_model(plain.model)
            ids = await tokenize(ctx, len(plain.prompt), _encode, ctx.tokenizer, plain.prompt, plain.add_special_tokens)
            want_strs = plain.return_token_strs
        return TokenizeResponse(
            count=len(ids),
            max_model_len=ctx.settings.max_model_len,
            tokens=ids,
            token_strs=list(ctx.tokenizer.convert_ids_to_tokens(ids)) if want_strs else None,
        )

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(req.model)
        check_token_ids(self.ctx, req.tokens, "tokens")
        text = await tokenize(self.ctx, len(req.tokens), decode_prompt, self.ctx.tokenizer, req.tokens)
        return DetokenizeResponse(prompt=text)

    def _check_model(self, model: str | None) -> None:
        if model is not None:  # optional here, as in vLLM
            check_model(self.ctx, model)


def _validate(model: type[BaseModel], body: Any) -> Any:
    """The body as `model`; a bad one is a 400 worded like every other endpoint's."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def version() -> VersionResponse:
    return VersionResponse(version=tandem_version())
