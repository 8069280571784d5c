"""What both generation endpoints share: request checks against the
deployment's limits, one backend request per choice (ChoiceState turns its
TokenOutputs into text deltas), a GenerationRun that drives the choices
concurrently and merges them, and the two ways to answer (one JSON body, or
an SSE stream). The endpoint modules only build requests and format output.
"""

from __future__ import annotations

import asyncio
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from protocol.messages import MIN_TEMPERATURE, GenerateRequest, Grammar, SamplingParams, TokenOutput
from server.api import BaseGenerationRequest, SpeculationInfo, UsageInfo
from server.backend import Backend, BackendError, BackendOverloaded
from server.errors import ClientDisconnected, InvalidRequest, ModelNotFound, RequestTimedOut, error_reply
from server.metrics import Metrics, RequestTracker
from server.tokenization import IncrementalDetokenizer, StopStringMatcher, token_bytes, token_text

SEED_MODULUS = 2**63


@dataclass(frozen=True)
class AppSettings:
    model_name: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    max_n: int = 8
    max_stop_sequences: int = 4
    max_body_bytes: int = 1_000_000
    # when set, every /v1 route needs `Authorization: Bearer <api_key>` (401 otherwise)
    api_key: str | None = None
    # a generation request still running after this many seconds is aborted (408)
    request_timeout_s: float | None = None
    # more names the `model` field may give (model_name is the one /v1/models and responses show)
    model_aliases: tuple[str, ...] = ()
    # browser origins allowed by CORS (() = no CORS headers; "*" = any)
    allowed_origins: tuple[str, ...] = ()

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.model_aliases)

    def __post_init__(self) -> None:
        if self.api_key == "":
            raise ValueError("api_key must not be empty (None: no key)")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")


@dataclass(frozen=True)
class ServerContext:
    """What the handlers of one app share (built once by create_app)."""

    backend: Backend
    tokenizer: Any
    settings: AppSettings
    metrics: Metrics
    vocab_size: int
    created: int  # unix seconds; the model card's `created`
    # long texts are tokenized here, one at a time, so the event loop keeps
    # answering (a 1 MB prompt takes about a second; the tokenizer releases the GIL)
    tokenizer_thread: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tandem-tokenize")
    )


# texts up to this many characters are tokenized inline (a few ms at most)
INLINE_TOKENIZE_CHARS = 16_384


async def tokenize(ctx: ServerContext, num_chars: int, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) (a tokenizer call over `num_chars` of text), off the event loop if long."""
    if num_chars <= INLINE_TOKENIZE_CHARS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(ctx.tokenizer_thread, fn, *args)


# -- checks against the deployment's limits ----------------------------------------


def check_request(ctx: ServerContext, req: BaseGenerationRequest) -> None:
    """What every generation request must pass before its prompt is read: a served model, and
    n / stop / logprobs within this server's limits."""
    check_model(ctx, req.model)
    check_generation_limits(ctx, req)


def check_model(ctx: ServerContext, model: str) -> None:
    names = ctx.settings.served_model_names
    if model not in names:
        shown = ", ".join(f"'{name}'" for name in names)
        raise ModelNotFound(f"The model '{model}' does not exist. Available: {shown}", param="model")


def check_generation_limits(ctx: ServerContext, req: BaseGenerationRequest) -> None:
    s = ctx.settings
    if req.n > s.max_n:
        raise InvalidRequest(f"'n' is {req.n}; this server allows at most {s.max_n}", param="n")
    if len(req.stop) > s.max_stop_sequences:
        raise InvalidRequest(
            f"{len(req.stop)} stop sequences given; at most {s.max_stop_sequences} are allowed", param="stop"
        )
    check_token_ids(ctx, sorted(req.logit_bias), "logit_bias")
    check_token_ids(ctx, req.stop_token_ids, "stop_token_ids")


def check_min_tokens(req: BaseGenerationRequest, max_tokens: int) -> None:
    if req.min_tokens > max_tokens:
        raise InvalidRequest(
            f"'min_tokens' ({req.min_tokens}) is more than the completion's maximum of {max_tokens} tokens",
            param="min_tokens",
        )


def check_capacity(ctx: ServerContext, num_choices: int, param: str) -> None:
    """Refuse at once what the backend's bound on queued + running requests
    cannot take: 400 if it never could (more choices than the bound), 429 if
    it cannot now. Nothing is submitted in either case."""
    limit = ctx.backend.max_pending
    if limit is None:
        return
    if num_choices > limit:
        raise InvalidRequest(
            f"this request needs {num_choices} backend requests (prompts x n); this server runs at most "
            f"{limit} at a time",
            param=param,
        )
    pending = ctx.backend.num_pending
    if pending + num_choices > limit:
        raise BackendOverloaded(
            f"server busy: {pending} requests queued or running (the limit is {limit}); retry later"
        )


def check_token_ids(ctx: ServerContext, ids: Sequence[int], param: str) -> None:
    bad = [t for t in ids if not 0 <= t < ctx.vocab_size]
    if bad:
        raise InvalidRequest(
            f"token id {bad[0]} is outside the vocabulary (valid ids: 0..{ctx.vocab_size - 1})", param=param
        )


def resolve_max_tokens(ctx: ServerContext, num_prompt: int, max_tokens: int | None, param: str) -> int:
    """Check that prompt and completion fit the context; None: the rest of it."""
    limit = ctx.settings.max_model_len
    if num_prompt == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    if num_prompt >= limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens; the prompt has {num_prompt} tokens, "
            f"which leaves no room for a completion",
            param=param,
        )
    if max_tokens is None:
        return limit - num_prompt
    if num_prompt + max_tokens > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens; you requested {num_prompt + max_tokens} "
            f"tokens ({num_prompt} in the prompt, {max_tokens} for the completion). "
            f"Reduce the prompt or max_tokens",
            param="max_tokens",
        )
    return max_tokens


def sampling_params(req: BaseGenerationRequest, choice_index: int, base_seed: int) -> SamplingParams:
    temperature = float(req.temperature)
    return SamplingParams(
        temperature=temperature if temperature >= MIN_TEMPERATURE else 0.0,
        top_p=float(req.top_p),
        top_k=max(req.top_k, 0),  # -1 means off, like vLLM
        seed=(base_seed + choice_index) % SEED_MODULUS,
        min_p=float(req.min_p),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        repetition_penalty=float(req.repetition_penalty),
        logit_bias=dict(req.logit_bias),
        min_tokens=req.min_tokens,
    )


def stop_token_ids(ctx: ServerContext, req: BaseGenerationRequest) -> list[int]:
    """The tokens that end a choice: EOS (unless ignore_eos) and the request's stop_token_ids."""
    eos = [] if req.ignore_eos else list(ctx.settings.eos_token_ids)
    return list(dict.fromkeys(eos + req.stop_token_ids))


def base_seed(req: BaseGenerationRequest) -> int:
    return req.seed if req.seed is not None else secrets.randbits(63)


# -- one choice = one backend request ------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    """A token for logprobs: its text, raw bytes, logprob and (for a generated
    token) the top alternatives."""

    token: str
    bytes: bytes
    logprob: float | None  # None: the prompt's first token (nothing before it to condition on)
    top: tuple["TokenInfo", ...] = ()


@dataclass(frozen=True)
class TextOptions:
    """How a choice's tokens become text (vLLM's request options)."""

    include_stop_str: bool = False  # keep the stop string (or stop token's text) in the output
    min_tokens: int = 0  # stop strings count only from this many tokens on
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    @classmethod
    def of(cls, req: BaseGenerationRequest) -> "TextOptions":
        return cls(req.include_stop_str_in_output, req.min_tokens, req.skip_special_tokens,
                   req.spaces_between_special_tokens)


@dataclass(frozen=True)
class ChoiceDelta:
    index: int
    text: str
    tokens: list[TokenInfo] | None  # None: logprobs not requested
    finish_reason: str | None


class ChoiceState:
    """Turns one backend request's TokenOutputs into text deltas: incremental
    detokenization, stop strings, logprobs, usage and speculation counts."""

    def __init__(self, index: int, request: GenerateRequest, tokenizer: Any, stops: Sequence[str],
                 tracker: RequestTracker, options: TextOptions = TextOptions()):
        self.index = index
        self.request = request
        self._tokenizer = tokenizer
        self._options = options
        self._detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_ids, skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
        )
        self._stops = StopStringMatcher(stops, options.include_stop_str)
        self._tracker = tracker
        self.text = ""
        self.tokens: list[TokenInfo] = []
        self.num_tokens = 0
        self.num_passes = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.finish_reason: str | None = None
        # echo with logprobs: the prompt's tokens, the first with logprob None
        self.prompt_tokens: list[TokenInfo] | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.request.num_logprobs is not None

    def _take_prompt_logprobs(self, output: TokenOutput) -> None:
        if self.request.prompt_logprobs is None or self.prompt_tokens is not None:
            return
        prompt = self.request.prompt_ids
        scores = output.prompt_logprobs
        if scores is None or len(scores) != len(prompt) - 1:
            raise BackendError("the backend sent no prompt logprobs for a request that asked for them")
        tops = output.prompt_top_logprobs or [[] for _ in scores]
        first = TokenInfo(token_text(self._tokenizer, prompt[0]), token_bytes(self._tokenizer, prompt[0]), None)
        self.prompt_tokens = [first] + [
            token_info(self._tokenizer, t, lp, top) for t, lp, top in zip(prompt[1:], scores, tops)
        ]

    def process(self, output: TokenOutput) -> ChoiceDelta:
        if output.finish_reason not in (None, "stop", "length"):
            raise BackendError(f"the backend ended the request ({output.finish_reason})")
        if self.wants_logprobs and len(output.logprobs or ()) < len(output.token_ids):
            raise BackendError("the backend sent no logprobs for a request that asked for them")
        self._take_prompt_logprobs(output)
        self.num_passes += 1
        self.num_draft_tokens += output.num_draft_tokens
        self.num_accepted_tokens += output.num_accepted_tokens
        pieces: list[str] = []
        tokens: list[TokenInfo] = []
        finish: str | None = None
        counted = 0
        last = len(output.token_ids) - 1
        for i, token_id in enumerate(output.token_ids):
            counted += 1
            if self.wants_logprobs:
                top = output.top_logprobs[i] if output.top_logprobs and i < len(output.top_logprobs) else []
                tokens.append(token_info(self._tokenizer, token_id, output.logprobs[i], top))
            if i == last and self._ended_by_stop_token(output) and not self._options.include_stop_str:
                break  # the stop token's text is not output (vLLM), unless include_stop_str_in_output
            text = self._detokenizer.push(token_id)
            if self.num_tokens + counted < self._options.min_tokens:
                pieces.append(text)  # stop strings do not count before min_tokens
                continue
            text, hit = self._stops.feed(text)
            pieces.append(text)
            if hit:  # the tokens after the one completing a stop string are dropped
                finish = "stop"
                break
        if finish is None and output.finish_reason is not None:
            text, hit = self._stops.feed(self._detokenizer.flush())
            pieces.append(text)
            if not hit:
                pieces.append(self._stops.flush())
            finish = "stop" if hit else output.finish_reason
        self.num_tokens += counted
        self._tracker.on_output(output, counted)
        if finish is not None:
            self.finish_reason = finish
            self._tracker.on_finish(finish)
        text = "".join(pieces)
        self.text += text
        self.tokens.extend(tokens)
        return ChoiceDelta(self.index, text, tokens if self.wants_logprobs else None, finish)

    def _ended_by_stop_token(self, output: TokenOutput) -> bool:
        return output.finish_reason == "stop" and output.token_ids[-1] in self.request.stop_token_ids


def token_info(tokenizer: Any, token_id: int, logprob: float, top: Sequence[tuple[int, float]] = ()) -> TokenInfo:
    """A token with its logprob and its top alternatives (id, logprob), as text and bytes."""
    return TokenInfo(
        token=token_text(tokenizer, token_id),
        bytes=token_bytes(tokenizer, token_id),
        logprob=float(logprob),
        top=tuple(TokenInfo(token_text(tokenizer, t), token_bytes(tokenizer, t), float(lp)) for t, lp in top),
    )


def prompt_choices(ctx: ServerContext, req: BaseGenerationRequest, request_id: str, first_index: int,
                   prompt_ids: list[int], max_tokens: int, seed: int, *, num_logprobs: int | None,
                   prompt_logprobs: int | None = None, grammar: Grammar | None = None) -> list[ChoiceState]:
    """The `req.n` choices of one prompt, numbered from `first_index`, followed together in
    the metrics (one prompt, its n choices); each choice draws its own seed (seed + index)."""
    prompt = ctx.metrics.track_prompt(len(prompt_ids), req.n, max_tokens)
    stops, options = stop_token_ids(ctx, req), TextOptions.of(req)
    choices = []
    for index in range(first_index, first_index + req.n):
        sampling = sampling_params(req, index, seed)
        request = GenerateRequest(
            request_id=f"{request_id}-{index}",
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            sampling=sampling if grammar is None else msgspec.structs.replace(sampling, grammar=grammar),
            stop_token_ids=stops,
            num_logprobs=num_logprobs,
            prompt_logprobs=prompt_logprobs,
            num_draft_tokens=req.num_draft_tokens,
        )
        choices.append(ChoiceState(index, request, ctx.tokenizer, req.stop, prompt.choice(), options))
    return choices


def usage(prompt_lengths: Sequence[int], choices: Sequence[ChoiceState]) -> UsageInfo:
    """Prompt tokens count once per prompt (not per choice), as OpenAI does."""
    prompt = sum(prompt_lengths)
    completion = sum(c.num_tokens for c in choices)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def speculation(choices: Sequence[ChoiceState]) -> SpeculationInfo:
    return SpeculationInfo(
        num_draft_tokens=sum(c.num_draft_tokens for c in choices),
        num_accepted_tokens=sum(c.num_accepted_tokens for c in choices),
        num_target_passes=sum(c.num_passes for c in choices),
    )


# -- driving the choices --------------------------------------------------------------


@dataclass(frozen=True)
class _Failed:
    index: int
    error: BaseException


class GenerationRun:
    """One task per choice iterates its backend request; deltas meet in one queue.

    Leaving a task's loop early (stop string, failure, cancel) closes the backend
    generator, which aborts the request in the workers. `cancel()` is safe to
    call at any time and more than once.
    """

    def __init__(self, backend: Any, choices: Sequence[ChoiceState], timeout_s: float | None = None):
        self.choices = list(choices)
        self._engine = backend
        self._queue: asyncio.Queue[ChoiceDelta | _Failed] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._drive(c), name=c.request.request_id) for c in self.choices]
        self._timer = None
        if timeout_s is not None:
            self._timer = asyncio.get_running_loop().call_later(timeout_s, self._time_out, timeout_s)

    def _time_out(self, timeout_s: float) -> None:
        """Past the deadline: abort every choice in the backend, fail the run."""
        self.cancel()
        self._queue.put_nowait(_Failed(-1, RequestTimedOut(
            f"the request did not finish within the server's timeout of {timeout_s:g} s and was aborted"
        )))

    async def _drive(self, choice: ChoiceState) -> None:
        try:
            async with aclosing(self._engine.generate(choice.request)) as outputs:
                async for output in outputs:
                    delta = choice.process(output)
                    self._queue.put_nowait(delta)
                    if delta.finish_reason is not None:
                        return
            raise BackendError("the backend's output stream ended without a finish reason")
        except Exception as exc:
            self._queue.put_nowait(_Failed(choice.index, exc))

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        """Every delta of every choice, as they come; raises the first failure."""
        remaining = len(self.choices)
        while remaining:
            item = await self._queue.get()
            if isinstance(item, _Failed):
                raise item.error
            if item.finish_reason is not None:
                remaining -= 1
            yield item
        if self._timer is not None:
            self._timer.cancel()

    async def wait(self) -> None:
        async for _ in self.deltas():
            pass

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for task in self._tasks:
            if not task.done():
                task.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(awaitable: Awaitable[Any], request: Request) -> Any:
    """Await `awaitable`, or raise ClientDisconnected if the client goes first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.create_task(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientDisconnected()


# -- answering -----------------------------------------------------------------------------


class ChoicesView:
    """Formats one request's choices: the JSON response, or the SSE chunks (one subclass per endpoint)."""

    include_usage: bool  # stream_options.include_usage

    def response(self) -> BaseModel:
        """The whole answer, once every choice has finished."""
        raise NotImplementedError

    def opening(self) -> list[BaseModel]:
        """Chunks before any output (chat: the role; completions: echoed prompts)."""
        raise NotImplementedError

    def chunk(self, delta: ChoiceDelta) -> BaseModel | None:
        """The chunk for one delta, or None when there is nothing to send."""
        raise NotImplementedError

    def empty_chunk(self) -> BaseModel:
        """A chunk with no choices."""
        raise NotImplementedError

    def usage_info(self) -> UsageInfo:
        raise NotImplementedError

    def usage_chunk(self) -> BaseModel:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        chunk = self.empty_chunk()
        chunk.usage = self.usage_info()
        return chunk


def sse(chunk: BaseModel, include_usage: bool) -> str:
    body = chunk.model_dump_json(exclude=None if include_usage else {"usage"})
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Starlette stops iterating a body on disconnect but does not close it;
    closing it here runs the generator's cleanup (aborting the backend) at once."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def answer(ctx: ServerContext, choices: list[ChoiceState], view: ChoicesView, request: Request, *,
                 stream: bool) -> Response:
    """Run the choices; answer with one JSON body, or stream them as SSE.

    A stream's headers go out once every choice has produced its first output,
    so that refusals by the backend (overloaded, unavailable) keep their status
    codes; later failures become an SSE error event.
    """
    run = GenerationRun(ctx.backend, choices, ctx.settings.request_timeout_s)
    metrics = ctx.metrics
    deltas = run.deltas() if stream else None
    try:
        if deltas is None:
            await unless_disconnected(run.wait(), request)
            return Response(view.response().model_dump_json(), media_type="application/json")
        first = await unless_disconnected(_first_of_each(deltas, len(run.choices)), request)
    except ClientDisconnected:
        run.cancel()
        metrics.record_failure("client_disconnected")
        return Response(status_code=499)
    except BaseException:
        run.cancel()
        raise
    return _ClosingStreamingResponse(
        _event_stream(run, deltas, first, view, metrics),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _first_of_each(deltas: AsyncIterator[ChoiceDelta], num_choices: int) -> list[ChoiceDelta]:
    seen: set[int] = set()
    buffered: list[ChoiceDelta] = []
    while len(seen) < num_choices:
        delta = await anext(deltas)
        buffered.append(delta)
        seen.add(delta.index)
    return buffered


async def _event_stream(run: GenerationRun, deltas: AsyncIterator[ChoiceDelta], first: list[ChoiceDelta],
                        formatter: ChoicesView, metrics: Metrics) -> AsyncIterator[str]:
    ended = False
    include_usage = formatter.include_usage
    try:
        for chunk in formatter.opening():
            yield sse(chunk, include_usage)
        for delta in first:
            if (chunk := formatter.chunk(delta)) is not None:
                yield sse(chunk, include_usage)
        async for delta in deltas:
            if (chunk := formatter.chunk(delta)) is not None:
                yield sse(chunk, include_usage)
        if include_usage:
            yield sse(formatter.usage_chunk(), include_usage)
        ended = True
    except Exception as exc:  # the backend failed after the stream began
        ended = True
        reply = error_reply(exc)
        metrics.record_failure(reply.reason)
        yield reply.sse_event()
    finally:
        run.cancel()
        if not ended:  # cancelled or closed: the client went away
            metrics.record_failure("client_disconnected")
    yield SSE_DONE
