"""Every message that crosses a process boundary: one class per message.

Flows (each process binds one PULL inbox; peers PUSH into it):

    server  -> verify : GenerateRequest, AbortRequest, DraftAvailability
    verify  -> server : TokenOutput, RequestFailed, EngineStatus
    verify  -> draft  : BeginDrafting, VerifiedPrefix, ReleaseRequest, TimeDraftPasses
    draft   -> verify : DraftTokens     (+ one float32 array frame of q when sampling), DraftPass, DraftPassCosts,
                        DraftIdle
    worker  -> server : WorkerReady (the start-up handshake, then every second: the heartbeat), WorkerStats

Drafting is a stream in every speculative mode: the verifier begins a request
on the draft once (its prompt and sampling), then publishes each new verified
prefix (a new epoch) as the tokens it added, so a round's traffic does not grow
with the sequence; the draft drafts ahead of the latest prefix it has seen, up
to the run-ahead limit it was given, and publishes every token.
`sd` waits for k drafts before verifying; `amusd` verifies whatever arrived.

The engine knows no text: token ids in, token ids out.
"""

from __future__ import annotations

import msgspec

# A temperature below this is greedy (vLLM's convention): dividing logits by
# 1e-62 overflows to inf and the warped distribution turns to NaN.
MIN_TEMPERATURE = 1e-5


class Grammar(msgspec.Struct, frozen=True):
    """What a request's output must match (response_format, tool_choice): every
    logits row of the draft and the target is masked to what it allows
    (workers/sampling/grammar.py). It may end only with one of stop_token_ids."""

    kind: str  # "json_schema": source is a JSON schema, as JSON text
    source: str
    stop_token_ids: tuple[int, ...] = ()


class SamplingParams(msgspec.Struct, frozen=True):
    """A request's logits processing, warping and randomness (vLLM's meanings).
    temperature < MIN_TEMPERATURE (0 included) means greedy.

    Both workers apply them to every position (workers/sampling/processors.py,
    then warping.py): the verifier to the target's rows, the draft to its own.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int = 0  # always set: the server draws one for unseeded requests
    min_p: float = 0.0  # drop tokens less probable than min_p x the most probable (after temperature)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; divides positive (multiplies negative) logits of prompt/output tokens
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # the stop tokens are masked until this many tokens are out
    grammar: Grammar | None = None  # None: unconstrained

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


class GenerateRequest(msgspec.Struct, tag=True):
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: list[int]
    num_logprobs: int | None = None  # None: no logprobs; N: chosen token + top N
    # None: no prompt logprobs (no cost); N: each prompt token's logprob given the ones
    # before (from the prefill pass) + top N, sent on the first output. With prompt
    # logprobs, max_tokens may be 0 (score the prompt, generate nothing).
    prompt_logprobs: int | None = None
    num_draft_tokens: int | None = None  # most drafts per round for this request (None: the server's; 0: none)


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
    run_ahead: int = 0  # drafts that had arrived when this verification started
    # on the first output of a request that asked: prompt tokens 1..n-1 (token 0 has none)
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


class RequestFailed(msgspec.Struct, tag=True):
    request_id: str
    message: str


class HistogramCounts(msgspec.Struct):
    """A histogram a worker keeps and reports whole in WorkerStats: how many
    observations fell in each bucket (upper bounds `bounds`, then +Inf), and their sum."""

    bounds: list[float]
    counts: list[int] = msgspec.field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))] += 1
        self.sum += value


# Bounds of the batch-size histograms the workers keep: requests in one model pass.
BATCH_SIZE_BOUNDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class WorkerStats(msgspec.Struct, tag=True):
    """Cumulative counters a worker reports every ~0.5 s (for /metrics)."""

    role: str
    busy_s: float  # time spent computing
    wall_s: float  # time since the worker became ready
    rollbacks: int = 0  # draft: cache crops because the verifier parted from it
    draft_tokens: int = 0  # draft: tokens drafted
    stale_drafts: int = 0  # verify: draft tokens dropped for an old epoch
    draft_wait_s: float = 0.0  # verify: time a round waited for drafts to arrive
    easyspec: dict[str, float] | None = None  # draft, easyspec modes: fuzzy/exact passes, calibration, exchange
    kv_cache_usage: float = 0.0  # verify: KV token slots in use over all slots (0..1)
    iteration_tokens: HistogramCounts | None = None  # verify: prompt + emitted tokens per engine step
    batch_sizes: HistogramCounts | None = None  # requests per model pass (verify: target, draft: draft)
    prefix_cache_queries: int = 0  # prompt tokens to prefill, of requests that may reuse a cached prefix
    prefix_cache_hits: int = 0  # of those, tokens whose KV was taken from a cache
    wide_steps: int = 0  # verify: steps whose target pass borrowed the idle draft's cores


class EngineStatus(msgspec.Struct, tag=True):
    """Sent by the verify worker whenever its queue changes."""

    num_running: int
    num_waiting: int


class WorkerReady(msgspec.Struct, tag=True):
    """A worker is up. Sent once its model is loaded (the handshake), then every
    second from a thread of its own (the heartbeat that supervises a worker on
    another host, server/external.py, and lets a restarted server find it)."""

    role: str  # "verify" | "draft"
    pid: int
    model: str
    vocab_size: int
    max_model_len: int
    mode: str = ""  # the speculation mode it was started for
    instance: str = ""  # random per process start: a restarted worker is a new instance (pids repeat in containers)


class BeginDrafting(msgspec.Struct, tag=True):
    """Draft for a request: its verified tokens so far (version `epoch`) and its sampling.

    Sent once when the verifier admits the request, and again (a new epoch)
    to a draft worker that came back. Later prefixes come as VerifiedPrefix.
    """

    request_id: str
    epoch: int
    tokens: list[int]
    max_run_ahead: int
    sampling: SamplingParams
    # what the draft's logits processing needs besides `sampling` (penalties
    # count output tokens only; min_tokens masks the stop tokens)
    num_prompt_tokens: int = 0  # tokens[:num_prompt_tokens] is the prompt (a grammar starts after it)
    stop_token_ids: list[int] = []


class VerifiedPrefix(msgspec.Struct, tag=True):
    """The verified tokens of a request, version `epoch` (one per verification):
    the previous version's first `start` tokens followed by `new_tokens`.

    The draft crops its cache to the common prefix of what it holds and the
    new version (a rollback when they part), adopts `epoch` for everything it
    publishes from now on, and drafts at most `max_run_ahead` tokens past it.
    """

    request_id: str
    epoch: int
    start: int  # the previous version's length: new_tokens[0] is at this position
    new_tokens: list[int]
    max_run_ahead: int


class DraftTokens(msgspec.Struct, tag=True):
    """Draft tokens for positions start, start+1, ... drafted from (an extension of)
    the verified prefix of `epoch`. The verifier drops other epochs as stale."""

    request_id: str
    epoch: int
    start: int
    token_ids: list[int]


class DraftPass(msgspec.Struct, tag=True):
    """The draft made one batched pass (drafting, a prompt chunk, catching up): adaptive
    speculation prices a draft running beside the target by its pace."""

    tokens: int  # tokens the pass fed
    seconds: float


class TimeDraftPasses(msgspec.Struct, tag=True):
    """At start-up, once the verifier has timed its own passes (the cores then quiet): the
    draft times its passes and answers DraftPassCosts. Not counted in DraftIdle.heard."""


class DraftPassCosts(msgspec.Struct, tag=True):
    """The answer to TimeDraftPasses: (requests, seconds) of a pass feeding one token for each
    of that many requests (none for a draft that cannot time them). Adaptive speculation seeds
    its draft costs with them (each replaced by the first measurement of its count)."""

    passes: list[tuple[int, float]]


class DraftIdle(msgspec.Struct, tag=True):
    """The draft has nothing left to compute (no request to draft or catch up for) until it is
    told more: a target that borrows the draft's cores takes them only then, not while the
    draft still feeds prompts or drafts ahead on them (both passes then ran at half speed);
    a synchronous target (sd, easyspec), whose cores the draft shares, starts a pass only then.
    Also sent once, when the draft worker has loaded (heard 0): its cores are quiet.

    heard: how many messages this draft process has taken in from the verifier. One still in
    flight when the draft said it idles may give it work: the verifier counts what it sent."""

    heard: int = 0


class DraftAvailability(msgspec.Struct, tag=True):
    """The launcher saw the draft worker die (False) or come back (True).

    While it is down, rounds run target-only (still lossless) without waiting.
    """

    available: bool


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
    | WorkerStats
    | BeginDrafting
    | VerifiedPrefix
    | DraftTokens
    | DraftPass
    | TimeDraftPasses
    | DraftPassCosts
    | DraftIdle
    | DraftAvailability
    | ReleaseRequest
)
