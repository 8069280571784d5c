"""An in-test Backend (server.backend's protocol, as WorkerBackend), so the
HTTP layer can be tested without worker processes.

Outputs are deterministic functions of the prompt (and of the seed when
sampling): tokens are taken from a corpus with multi-byte characters, 1-4 per
output like a speculative round; max_tokens, stop_token_ids, num_logprobs and
prompt_logprobs are honoured. Marker strings in the prompt text drive the failure paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random

from protocol.messages import GenerateRequest, TokenOutput
from protocol.messages import WorkerStats
from server.backend import BackendError, BackendHealth, BackendOverloaded, BackendStats, BackendUnavailable

MARK_FAIL = "@@fail@@"  # BackendError after the first output
MARK_SLOW = "@@slow@@"  # 50 ms between outputs, no EOS
MARK_OVERLOADED = "@@overloaded@@"  # BackendOverloaded at submission
MARK_NO_EOS = "@@no-eos@@"  # never emits a stop token
MARK_TOOL_CALL = "@@tool-call@@"  # answers TOOL_CALL_TEXT (a Qwen2.5-style tool call), then EOS

TOOL_CALL_TEXT = (
    'Let me look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>'
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts a few tokens "
    "🤗 and the target verifies them in one pass: 你好，世界！ Ünïcödé façade, naïve café. "
    "Emoji 👨‍👩‍👧 and 🚀🚀 travel in pieces;   three spaces, tabs\tand\nnew lines. "
)


class FakeBackend(BackendHealth):
    max_pending: int | None = None  # unbounded

    def __init__(self, tokenizer, step_delay_s: float = 0.0):
        super().__init__()
        self._tokenizer = tokenizer
        self._corpus = tokenizer.encode(CORPUS, add_special_tokens=False)
        self._step_delay_s = step_delay_s
        self.stats = BackendStats()
        self.worker_stats: dict[str, WorkerStats] = {}
        self.restarts: dict[str, int] = {}
        self.requests: list[GenerateRequest] = []  # every submitted request
        self.finished: set[str] = set()  # ids that reached a finish_reason
        self.closed_early: set[str] = set()  # ids whose generator was closed before finishing (aborts)
        self._active: set[str] = set()

    @property
    def num_pending(self) -> int:
        return len(self._active)

    def request(self, request_id: str) -> GenerateRequest:
        return next(r for r in self.requests if r.request_id == request_id)

    # -- generation ------------------------------------------------------------------

    def _status_changed(self) -> None:
        self.stats = BackendStats(num_running=len(self._active), num_waiting=0)

    async def generate(self, request: GenerateRequest):
        if not self.healthy:
            raise BackendUnavailable(f"backend unavailable: {self._unhealthy_reason}")
        prompt = self._tokenizer.decode(request.prompt_ids)
        if MARK_OVERLOADED in prompt:
            raise BackendOverloaded("server busy: simulated overload")
        self.requests.append(request)
        self._active.add(request.request_id)
        self._status_changed()
        try:
            async for output in self._outputs(request, prompt):
                yield output
        finally:
            self._active.discard(request.request_id)
            self._status_changed()
            if request.request_id not in self.finished:
                self.closed_early.add(request.request_id)

    async def _outputs(self, request: GenerateRequest, prompt: str):
        key = repr((request.prompt_ids, request.sampling.seed if not request.sampling.greedy else 0))
        rng = random.Random(hashlib.sha256(key.encode()).digest())
        start = rng.randrange(len(self._corpus))
        slow = MARK_SLOW in prompt
        eos_at = None
        markers = (MARK_FAIL, MARK_SLOW, MARK_NO_EOS)
        if request.stop_token_ids and not any(m in prompt for m in markers) and rng.random() < 0.3:
            eos_at = rng.randrange(1, 40)
        corpus = self._corpus
        if MARK_TOOL_CALL in prompt:
            corpus = self._tokenizer.encode(TOOL_CALL_TEXT, add_special_tokens=False)
            start, eos_at = 0, len(corpus)
        emitted = 0
        if request.max_tokens == 0:  # echo only: the prompt scored, nothing generated
            output = TokenOutput(request_id=request.request_id, token_ids=[], finish_reason="length")
            self._score_prompt(request, output)
            self.finished.add(request.request_id)
            yield output
            return
        for step in itertools.count():
            drafted = rng.randint(0, 3)
            tokens: list[int] = []
            finish = None
            for _ in range(drafted + 1):
                if emitted == eos_at:
                    token = request.stop_token_ids[0]
                else:
                    token = corpus[(start + emitted) % len(corpus)]
                tokens.append(token)
                emitted += 1
                if token in request.stop_token_ids:
                    finish = "stop"
                    break
                if emitted >= request.max_tokens:
                    finish = "length"
                    break
            if MARK_FAIL in prompt and step == 1:
                raise BackendError("simulated backend failure")
            output = TokenOutput(
                request_id=request.request_id,
                token_ids=tokens,
                finish_reason=finish,
                num_draft_tokens=drafted,
                num_accepted_tokens=min(drafted, len(tokens) - 1),
                queue_time_s=0.001 if emitted == len(tokens) else None,
            )
            if request.num_logprobs is not None:
                output.logprobs = [self._logprob(t) for t in tokens]
                output.top_logprobs = [self._top(t, request.num_logprobs) for t in tokens]
            if step == 0:
                self._score_prompt(request, output)
            await asyncio.sleep(0.05 if slow else self._step_delay_s)
            if finish is not None:
                self.finished.add(request.request_id)
            yield output
            if finish is not None:
                return

    def _score_prompt(self, request: GenerateRequest, output: TokenOutput) -> None:
        """Prompt logprobs, as the verify engine sends them on a request's first output."""
        if request.prompt_logprobs is not None:
            scored = request.prompt_ids[1:]
            output.prompt_logprobs = [self._logprob(t) for t in scored]
            output.prompt_top_logprobs = [self._top(t, request.prompt_logprobs) for t in scored]

    @staticmethod
    def _logprob(token: int) -> float:
        return -0.05 - (token % 97) / 50.0

    def _top(self, token: int, n: int) -> list[tuple[int, float]]:
        """The chosen token first (it is the most likely here), then n-1 others, descending."""
        if n == 0:
            return []
        lp = self._logprob(token)
        others = [(token + k) % len(self._tokenizer) for k in range(1, n)]
        return [(token, lp)] + [(t, lp - 0.5 * k) for k, t in enumerate(others, start=1)]
