"""The draft worker process: the draft model, drafting continuously.

    python -m workers.draft --config-json '{...}'   (started by the launcher)

Each step drafts one token for every request with room to run ahead, in one
batched draft pass, and publishes each at once; between tokens it takes in new verified prefixes
(rollback or re-tag) and releases. With nothing to draft it blocks on its inbox.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from configs.loader import Config
from protocol.messages import (
    BeginDrafting,
    DraftIdle,
    DraftPass,
    DraftPassCosts,
    TimeDraftPasses,
    DraftTokens,
    ReleaseRequest,
    VerifiedPrefix,
    WorkerStats,
)
from workers.engine import DraftEngine, DraftModel, PlainDraft
from workers.ranks.rendezvous import deployment_secret
from workers.sampling.grammar import Grammars
from workers.shell import (
    apply_placement,
    become_worker,
    load_worker_model,
    open_inbox,
    open_outbox,
    start_heartbeat,
    worker_args,
)

log = logging.getLogger("tandem.draft")

STATS_INTERVAL_S = 0.5


def draft_model(config: Config, device) -> tuple[DraftModel, object]:
    """The plain draft, or the layer-parallel one (EasySpec): this process is
    rank 0, the others are spawned on placement.draft_ranks."""
    model, path = load_worker_model(config.draft, device)
    if not config.mode.layer_parallel_draft:
        return PlainDraft(model), path
    from workers.easyspec import DraftCheckpoint, LayerParallelDraftModel
    from workers.model.dtypes import dtype_name

    placement = config.placement_of_mode
    checkpoint = DraftCheckpoint(str(path), dtype_name(model.dtype), config.draft.quantization)  # "auto" as rank 0 resolved it
    # a reduced (FR-Spec) head is small: rank 0 computes it whole instead of by vocab slices
    easyspec = replace(config.easyspec, split_head=config.easyspec.split_head and not config.draft.head_vocab)
    ranks = [placement.draft, *placement.draft_ranks]
    draft = LayerParallelDraftModel.from_config(
        model, checkpoint, easyspec, ranks, secret=deployment_secret(config.curve),
        startup_timeout_s=config.server.startup_timeout_s, heartbeat_timeout_s=config.server.heartbeat_timeout_s,
    )  # fmt: skip
    return draft, path


def external_rank(config: Config, rank: int):
    """What `tandem worker --role draft-rank --rank N` runs: (program, placement,
    rendezvous), built from the config as rank 0 builds them (workers.ranks.run_external_rank)."""
    from workers.easyspec.ranks import DraftCheckpoint, DraftFollower
    from workers.model import resolve_checkpoint
    from workers.ranks.group import external_rank_setup

    placement = config.placement_of_mode
    path = resolve_checkpoint(config.draft.path, progress=log.info)
    program = DraftFollower(DraftCheckpoint(str(path), config.draft.dtype, config.draft.quantization))
    return external_rank_setup(program, [placement.draft, *placement.draft_ranks], rank, config.easyspec, config)


class DraftWorker:
    def __init__(self, config: Config):
        self.config = config
        device = apply_placement(config.placement_of_mode.draft)
        self.model, path = draft_model(config, device)
        self.engine = DraftEngine(
            self.model,
            max_model_len=config.scheduler.max_model_len,
            max_requests=config.scheduler.max_running_requests,
            device=device,
            grammars=Grammars(path, self.model.args.vocab_size),
            max_batch_size=config.scheduler.max_batch_size,
            # not the EasySpec draft: its cache tracks fuzzy and exact positions of its own passes
            prefix_caching=config.scheduler.prefix_caching and isinstance(self.model, PlainDraft),
            prefill_chunk=config.scheduler.prefill_chunk_tokens,
            catch_up=config.draft_catches_up,
        )
        self.inbox = open_inbox(config, "draft")
        self.to_verify = open_outbox(config, "verify")
        self.to_server = open_outbox(config, "server")
        self.busy_s = 0.0
        self.heard = 0  # messages taken in from the verifier (DraftIdle.heard)

    def _publish(self, drafted: DraftTokens | None) -> None:
        if drafted is not None:
            self.to_verify.send(drafted)

    def _handle(self, message) -> None:
        if isinstance(message, TimeDraftPasses):  # start-up, on quiet cores: not work the verifier counts
            self.to_verify.send(DraftPassCosts(self.engine.measure_pass_costs()))
            return
        self.heard += 1
        if isinstance(message, (BeginDrafting, VerifiedPrefix, ReleaseRequest)):
            self._publish(self.engine.handle(message))
        else:
            log.warning("draft worker ignores unexpected %s", type(message).__name__)

    def run(self) -> None:
        self.to_verify.send(DraftIdle(self.heard))  # loaded: a target that borrows its cores may time them now
        start_heartbeat(self.config, "draft", self.config.draft.path, self.model.args.vocab_size)
        started = last_stats = time.monotonic()
        while True:
            # take in everything that arrived; block (up to the stats interval) only when idle
            decoded = self.inbox.recv(timeout_ms=0 if self.engine.has_work else int(STATS_INTERVAL_S * 1000))
            worked = decoded is not None  # told something, or (below) drafted
            while decoded is not None:
                self._handle(decoded.message)
                decoded = self.inbox.recv(timeout_ms=0)
            if self.engine.has_work:
                worked = True
                step_started, passes = time.monotonic(), self.engine.passes
                try:
                    drafted = self.engine.step_all()
                except Exception:  # the verifier times out on these requests and goes on target-only
                    log.exception("drafting failed")
                    drafted = []
                seconds = time.monotonic() - step_started
                self.busy_s += seconds
                for each in drafted:
                    self._publish(each)
                if self.engine.passes > passes and not self.config.mode.synchronous:  # its pace, for amusd's plans
                    self.to_verify.send(DraftPass(self.engine.pass_tokens, seconds))
            if worked and not self.engine.has_work:
                # what it was told is done: a synchronous target may start its pass, a target
                # beside it may borrow its cores
                self.to_verify.send(DraftIdle(self.heard))
            now = time.monotonic()
            if now - last_stats >= STATS_INTERVAL_S:
                last_stats = now
                self._report(now - started)

    def _report(self, wall_s: float) -> None:
        stats = self.model.stats()  # the EasySpec draft's pass counters (None for a plain draft)
        easyspec = None
        if stats is not None:
            easyspec = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        self.to_server.send(
            WorkerStats(
                "draft",
                self.busy_s,
                wall_s,
                rollbacks=self.engine.num_rollbacks,
                draft_tokens=self.engine.num_drafted,
                easyspec=easyspec,
                batch_sizes=self.engine.batch_sizes,
                prefix_cache_queries=self.engine.prefix_cache_queries,
                prefix_cache_hits=self.engine.prefix_cache_hits,
            )
        )

    def close(self) -> None:
        self.model.close()  # the EasySpec ranks


def run(config: Config) -> None:
    worker = DraftWorker(config)
    try:
        worker.run()
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    become_worker("draft")
    run(worker_args("draft", argv))


if __name__ == "__main__":
    main()
