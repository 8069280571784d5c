"""Every message that crosses a process boundary: one class per message.

Flows (each process binds one PULL inbox; peers PUSH into it):

    server  -> verify : GenerateRequest, AbortRequest
    verify  -> server : TokenOutput, RequestFailed, EngineStatus
    verify  -> draft  : DraftRequest, ReleaseRequest
    draft   -> verify : DraftProposal   (+ one float32 tensor frame of q when sampling)
    worker  -> server : WorkerReady     (the start-up handshake)

The engine knows no text: token ids in, token ids out.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, frozen=True):
    """A request's warping and randomness. temperature == 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int = 0  # always set: the server draws one for unseeded requests

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class GenerateRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: list[int]
    num_logprobs: int | None = None  # None: no logprobs; N: chosen token + top N


class AbortRequest(msgspec.Struct, tag=True):
    request_id: str


class TokenOutput(msgspec.Struct, tag=True):
    """New tokens of one request from one target pass (a round)."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_draft_tokens: int = 0  # drafts verified in this pass
    num_accepted_tokens: int = 0  # of which accepted (a prefix)
    logprobs: list[float] | None = None  # per token, target's raw log-softmax
    top_logprobs: list[list[tuple[int, float]]] | None = None
    queue_time_s: float | None = None  # on a request's first output: time spent waiting


class RequestFailed(msgspec.Struct, tag=True):
    request_id: str
    message: str


class EngineStatus(msgspec.Struct, tag=True):
    """Sent by the verify worker whenever its queue changes."""

    num_running: int
    num_waiting: int


class WorkerReady(msgspec.Struct, tag=True):
    role: str  # "verify" | "draft"
    pid: int
    model: str
    vocab_size: int
    max_model_len: int


class DraftRequest(msgspec.Struct, tag=True):
    """Draft `num_tokens` tokens after `tokens` (the full verified sequence).

    The draft worker keeps its own cache per request and crops it to the common
    prefix of what it holds and `tokens` before drafting (rollback).
    """

    request_id: str
    round_id: int  # echoed in the proposal; a mismatching reply is stale
    tokens: list[int]
    num_tokens: int
    sampling: SamplingParams


class DraftProposal(msgspec.Struct, tag=True):
    request_id: str
    round_id: int
    token_ids: list[int]
    # True when a [len(token_ids), vocab] float32 frame of the draft's warped
    # distributions q follows; False for greedy drafts (q is one-hot).
    has_probs: bool = False


class ReleaseRequest(msgspec.Struct, tag=True):
    """The request ended: free its draft cache."""

    request_id: str


Message = (
    GenerateRequest
    | AbortRequest
    | TokenOutput
    | RequestFailed
    | EngineStatus
    | WorkerReady
    | DraftRequest
    | DraftProposal
    | ReleaseRequest
)
