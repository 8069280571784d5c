"""LayerParallelDraftModel: an EasySpec draft behind DraftEngine's DraftModel interface.

    forward(tokens, cache, num_logits=1) -> logits [num_logits, V] float32
    new_cache(max_seq_len) -> DraftKVCache (a KVCache: crop, length, capacity)
    after_rollback(cache, keep), after_verified(cache, verified_len): the round hooks
    stats(), close(), args

What happens per pass:

- the first pass of a cache (the prompt) is exact;
- the first pass after `after_rollback` (a round boundary: the verifier's
  answer came in) is, by the calibration policy, a CALIBRATION pass: the cache is cut back
  to its last exact position and ONE exact layer-by-layer pass runs over the
  tokens since then (accepted drafts, whose KV was fuzzy) plus the newly fed
  ones (the correction/bonus token); it overwrites their KV with exact entries
  and yields the next draft token's logits;
  policy "every_round" (default): every round; "on_mismatch": only when the crop
  dropped tokens (a draft was rejected); "never": the pass is fuzzy;
- every other pass (drafting) is fuzzy: layer-parallel by the plan.

`after_verified` (a verification kept to the drafts: no rollback, the draft
runs on, as in an asynchronous mode) calibrates the newly verified tokens in
place by the policy: `calibrate(cache, upto)` recalibrates [exact_length, upto),
keeping the tokens drafted past `upto`.
`forward(..., exact=True/False)` overrides the policy for one pass.

`forward_batch(segments)` runs several requests' passes (each decided as above)
as one pass: every request gets bit for bit what `forward` gives it alone.

Executors take a list of jobs (fuzzy.Job: one request's pass) and run them in one
pass: `LocalExecutor` computes every rank's layers in this process (the
single-process reference of the math); `DraftRankGroup` (ranks.py) runs them on D
processes, one command per pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Sequence

import torch

from configs.choices import CALIBRATION_POLICIES, check_choice
from configs.loader import EasySpecConfig
from workers.model import LlamaModel

from .cache import DraftKVCache
from workers.ranks.channel import ExchangeStats
from .fuzzy import Job, LayerRunner, hidden_rows, stacked
from .plan import LayerPlan, plan_of


@dataclass
class DraftStats:
    """Counters of the passes (seconds are wall time on rank 0)."""

    fuzzy_passes: int = 0
    fuzzy_tokens: int = 0
    fuzzy_s: float = 0.0
    exact_passes: int = 0  # prompts, calibrations and explicit exact passes
    exact_tokens: int = 0
    exact_s: float = 0.0
    calibrations: int = 0  # exact passes that replaced fuzzy KV (policy or calibrate())
    calibrated_tokens: int = 0  # tokens whose fuzzy KV was recomputed
    calibration_s: float = 0.0
    exchange: ExchangeStats = field(default_factory=ExchangeStats)

    def snapshot(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "exchange"}
        out["exchange"] = self.exchange.snapshot()
        out["exchange_count"] = self.exchange.total_count
        out["exchange_s"] = self.exchange.total_seconds
        return out


class _Pending(NamedTuple):
    """A job and what its pass counts as: tokens whose fuzzy KV it recomputes, a calibration."""

    job: Job
    recalibrated: int
    calibration: bool


class LocalExecutor:
    """Every layer of every group in this process: the math of the fuzzy forward, as a reference."""

    healthy = True

    def __init__(self, model: LlamaModel, plan: LayerPlan, variant: str = "full"):
        self.model = model
        self.stats = ExchangeStats()  # stays empty: nothing is exchanged
        self.configure(plan, variant, False)

    def configure(self, plan: LayerPlan, variant: str, split_head: bool) -> None:
        self.runner = LayerRunner(self.model, plan, variant)
        self.plan, self.variant, self.split_head = plan, variant, split_head

    def new_cache(self, max_seq_len: int) -> DraftKVCache:
        return self.model.new_cache(max_seq_len, DraftKVCache)

    def forward(self, jobs: Sequence[Job]) -> list[torch.Tensor]:
        """One pass over the jobs (each its own cache): logits [num_logits, V] float32 per job."""
        return self.model.head_batch(*stacked(hidden_rows(self.model, self.runner, jobs)))

    def close(self) -> None:
        pass


class LayerParallelDraftModel:
    def __init__(
        self,
        model: LlamaModel,
        executor,
        *,
        calibration: str = "every_round",
        max_fuzzy_tokens: int = 64,
        max_exact_tokens: int = 4096,
    ):
        check_choice("calibration policy", calibration, CALIBRATION_POLICIES)
        self.model = model
        self.executor = executor
        self.calibration = calibration
        self.max_fuzzy_tokens = max_fuzzy_tokens
        self.max_exact_tokens = max_exact_tokens
        self._stats = DraftStats(exchange=executor.stats)

    # -- construction ----------------------------------------------------------

    @classmethod
    def local(cls, model: LlamaModel, plan: LayerPlan, *, variant: str = "full", calibration: str = "every_round"):
        """All ranks' layers in this process (the reference; no speed-up)."""
        return cls(model, LocalExecutor(model, plan, variant), calibration=calibration)

    @classmethod
    def distributed(
        cls,
        model: LlamaModel,
        checkpoint,
        plan: LayerPlan,
        *,
        variant: str = "full",
        calibration: str = "every_round",
        placements: Sequence = (),
        channel: str = "auto",
        split_head: bool = True,
        timeout_s: float = 60.0,
        **group_options,
    ):
        """Rank 0 in this process (`model`), ranks 1..D-1 spawned with `checkpoint` (a ranks.DraftCheckpoint).

        placements: one per rank (device, cores, threads); placements[0] is not applied
        here: this process is rank 0, placed by its caller.
        """
        from .ranks import DraftRankGroup

        group = DraftRankGroup(
            model,
            checkpoint,
            plan,
            variant=variant,
            split_head=split_head,
            placements=placements,
            channel=channel,
            timeout_s=timeout_s,
            **group_options,
        )
        return cls(model, group, calibration=calibration, max_fuzzy_tokens=group.max_fuzzy_tokens)

    @classmethod
    def from_config(cls, model: LlamaModel, checkpoint, config: EasySpecConfig, placements: Sequence, secret=None, **group_options):
        """The draft a worker builds from its `easyspec` config and its D placements
        (`secret`, group_options: workers.ranks.RankGroup's, for ranks on other hosts)."""
        plan = plan_of(config, model.args.n_layers, len(placements))
        if len(placements) < 2:
            return cls.local(model, plan, variant=config.variant, calibration=config.calibration)
        return cls.distributed(
            model,
            checkpoint,
            plan,
            variant=config.variant,
            calibration=config.calibration,
            placements=placements,
            channel=config.channel,
            split_head=config.split_head,
            timeout_s=config.timeout_s,
            rendezvous=config.rendezvous,
            secret=secret,
            **group_options,
        )

    def configure(self, plan: LayerPlan | None = None, variant: str | None = None, *, calibration=None, split_head=None):
        """Switch plan / variant / policy / head split between requests (benchmarks, tests)."""
        ex = self.executor
        ex.configure(plan or ex.plan, variant or ex.variant, ex.split_head if split_head is None else split_head)
        if calibration is not None:
            if calibration not in CALIBRATION_POLICIES:
                raise ValueError(f"unknown calibration policy {calibration!r}")
            self.calibration = calibration

    def close(self) -> None:
        """Shut the ranks down (no-op for the local executor)."""
        self.executor.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the model interface -----------------------------------------------------

    @property
    def args(self):
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def plan(self) -> LayerPlan:
        return self.executor.plan

    @property
    def variant(self) -> str:
        return self.executor.variant

    @property
    def healthy(self) -> bool:
        return self.executor.healthy

    def new_cache(self, max_seq_len: int) -> DraftKVCache:
        return self.executor.new_cache(max_seq_len)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: DraftKVCache, num_logits: int = 1, *, exact: bool | None = None
    ) -> torch.Tensor:
        """tokens: [T] ids at positions cache.length.. -> logits [num_logits, V] float32 (see module doc)."""
        return self._passes([self._pending(tokens, cache, num_logits, exact)])[0]

    @torch.inference_mode()
    def forward_batch(self, segments) -> list[torch.Tensor]:
        """Several requests (workers.model.model.Segment each, one per cache) in one pass: the
        calibration/prompt passes of some and the fuzzy drafting passes of the others in one
        command to the ranks; each gets bit for bit what `forward` gives it alone."""
        if len({id(s.cache) for s in segments}) != len(segments):
            raise ValueError("forward_batch: one segment per cache")
        return self._passes([self._pending(s.tokens, s.cache, s.num_logits, None) for s in segments])

    def _pending(self, tokens: torch.Tensor, cache: DraftKVCache, num_logits: int, exact: bool | None) -> "_Pending":
        """The job a forward of tokens over cache runs (checked; the policy picks exact or fuzzy)."""
        T = tokens.shape[0]
        if T < 1:
            raise ValueError("forward needs at least one token")
        if not 1 <= num_logits <= T:
            raise ValueError(f"num_logits must be in [1, {T}], got {num_logits}")
        if cache.length + T > cache.capacity:
            raise ValueError(f"KV cache overflow: {cache.length} + {T} tokens > capacity {cache.capacity}")
        round_start, rolled_back = cache.round_start, cache.rolled_back
        cache.round_start = cache.rolled_back = False
        if exact is None:
            exact = (
                cache.length == 0
                or self.plan.is_sequential
                or (round_start and self.calibration == "every_round")
                or (round_start and rolled_back and self.calibration == "on_mismatch")
            )
        start = cache.length
        cache.record(start, tokens)
        if not exact:
            return _Pending(Job(cache, start, tokens, num_logits, False, start + T), 0, False)
        redo_from = cache.exact_length
        feed = tokens if redo_from == start else torch.cat([cache.token_ids[redo_from:start].to(tokens.device), tokens])
        calibration = start > 0 and not self.plan.is_sequential
        return _Pending(Job(cache, redo_from, feed, num_logits, True, start + T), start - redo_from, calibration)

    def after_rollback(self, cache: DraftKVCache, keep: int) -> None:
        """The verifier's answer opens a round: crop to `keep`; the next forward is the
        round's first pass (a calibration pass by the policy)."""
        cache.rolled_back = cache.rolled_back or keep < cache.length  # until that forward consumes it
        cache.crop(keep)
        cache.round_start = True

    def after_verified(self, cache: DraftKVCache, verified_len: int) -> None:
        """A verification kept to the drafts without a rollback (the draft runs on):
        calibrate the newly verified tokens now, by the policy."""
        if self.calibration == "every_round":
            self.calibrate(cache, verified_len)

    def calibrate(self, cache: DraftKVCache, upto: int | None = None) -> torch.Tensor | None:
        """Recompute the fuzzy KV of [exact_length, upto) exactly, in place (the tokens past
        `upto` stay). Returns the logits [1, V] after position upto-1, or None if already exact."""
        upto = cache.length if upto is None else upto
        if not 0 <= upto <= cache.length:
            raise ValueError(f"cannot calibrate up to {upto}: the cache holds {cache.length} positions")
        start = cache.exact_length
        if start >= upto:
            return None
        with torch.inference_mode():
            feed = cache.token_ids[start:upto].to(self.device)
            job = Job(cache, start, feed, 1, True, max(cache.length, upto))
            return self._passes([_Pending(job, upto - start, True)])[0]

    def _passes(self, pending: list["_Pending"]) -> list[torch.Tensor]:
        """Run the jobs: those within the executor's per-pass limits in one batched pass, a
        longer one alone in chunks; then advance the caches and count."""
        out: list[torch.Tensor] = [None] * len(pending)  # type: ignore[list-item]
        together = [i for i, p in enumerate(pending) if p.job.tokens.shape[0] <= self._chunk(p.job.exact)]
        if together:
            t0 = time.perf_counter()
            logits = self.executor.forward([pending[i].job for i in together])
            elapsed = time.perf_counter() - t0
            total = sum(pending[i].job.tokens.shape[0] for i in together)
            for i, rows in zip(together, logits):
                out[i] = rows
                self._done(pending[i], elapsed * pending[i].job.tokens.shape[0] / total)
        for i, p in enumerate(pending):
            if out[i] is None:
                t0 = time.perf_counter()
                out[i] = self._chunked(p.job)
                self._done(p, time.perf_counter() - t0)
        return out

    def _chunk(self, exact: bool) -> int:
        return self.max_exact_tokens if exact else self.max_fuzzy_tokens

    def _done(self, p: "_Pending", elapsed: float) -> None:
        """Advance the job's cache and count its pass (elapsed: its share of the wall time)."""
        job, s = p.job, self._stats
        cache, T = job.cache, job.tokens.shape[0]
        cache.length = job.final_length
        if not job.exact:
            if self.plan.is_sequential and cache.exact_length == job.start:  # no parallel group: exact
                cache.exact_length = job.start + T
            s.fuzzy_passes += 1
            s.fuzzy_tokens += T
            s.fuzzy_s += elapsed
            return
        cache.exact_length = job.start + T
        s.exact_passes += 1
        s.exact_tokens += T
        s.exact_s += elapsed
        if p.calibration:
            s.calibrations += 1
            s.calibration_s += elapsed
            s.calibrated_tokens += p.recalibrated

    def _chunked(self, job: Job) -> torch.Tensor:
        """A job longer than the executor takes in one pass, in chunks; logits of its last num_logits tokens."""
        T, chunk = job.tokens.shape[0], self._chunk(job.exact)
        first_needed = T - job.num_logits
        parts = []
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            rows = b - max(a, first_needed)
            piece = job._replace(start=job.start + a, tokens=job.tokens[a:b], num_logits=max(1, rows), final_length=job.start + b)
            out = self.executor.forward([piece])[0]
            if rows > 0:
                parts.append(out)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # -- introspection -----------------------------------------------------------

    def stats(self) -> dict:
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        self.executor.stats.reset()
        self._stats = DraftStats(exchange=self.executor.stats)
