"""The verify worker process: the target model and the verify engine.

    python -m workers.verify --config-json '{...}'   (started by the launcher)

A reader thread owns the inbox socket: draft tokens go to the draft stream's
queue, everything else to the engine loop on the main thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial

import zmq

from configs.loader import Config
from protocol.messages import (
    AbortRequest,
    DraftAvailability,
    DraftIdle,
    DraftPass,
    DraftPassCosts,
    TimeDraftPasses,
    DraftTokens,
    EngineStatus,
    GenerateRequest,
    RequestFailed,
    WorkerStats,
)
from protocol.sockets import Outbox
from workers.engine import DraftStream, NoDraft, RequestRejected, VerifyEngine
from workers.engine.prompt_lookup import LookupFirst, PromptLookup
from workers.sampling.grammar import Grammars
from workers.shell import (
    BorrowedCores,
    apply_placement,
    become_worker,
    open_inbox,
    open_outbox,
    start_heartbeat,
    worker_args,
)
from workers.tensor_parallel import target_model

log = logging.getLogger("tandem.verify")

STATS_INTERVAL_S = 0.5
DRAFT_TIMING_TIMEOUT_S = 60.0  # start-up: the longest wait for the draft's timed passes (DraftPassCosts)


class SocketTransport:
    """The draft stream's link to the draft worker process."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self.arrived: queue.Queue = queue.Queue()  # DraftTokens and DraftIdle from the reader thread, in order

    def send(self, message) -> bool:
        # never block the verifier on the draft: with the draft unreachable (gone,
        # not yet noticed) past the socket's queue, a message is dropped; the draft
        # is begun anew when it is back
        try:
            self.outbox.send(message, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a %s for the unreachable draft worker", type(message).__name__)
            return False
        return True

    def receive(self, timeout_s: float):
        try:
            first = self.arrived.get(timeout=timeout_s) if timeout_s > 0 else self.arrived.get_nowait()
        except queue.Empty:
            return []
        out = [first]
        while True:
            try:
                out.append(self.arrived.get_nowait())
            except queue.Empty:
                return out


def make_draft_source(config: Config, draft_outbox):
    """The draft source of config's mode; `draft_outbox()` opens the socket to the draft worker."""
    mode, speculation = config.mode, config.speculation
    lookup = PromptLookup(
        num_draft_tokens=speculation.num_draft_tokens,
        min_n=speculation.prompt_lookup_min,
        max_n=speculation.prompt_lookup_max,
    )
    if not mode.drafts:
        return (lookup if mode.lookup else NoDraft()), None
    transport = SocketTransport(draft_outbox())
    stream = (partial(LookupFirst, lookup=lookup) if mode.lookup else DraftStream)(
        transport,
        num_draft_tokens=speculation.num_draft_tokens,
        # synchronous: the draft drafts exactly the next round's k; else it runs ahead
        max_run_ahead=speculation.num_draft_tokens if mode.synchronous else speculation.max_run_ahead,
        mode=mode,
        timeout_s=speculation.draft_timeout_s,
        holds_back=not config.draft_catches_up,  # it needs a request's tokens only when it drafts again
    )
    return stream, transport


class VerifyWorker:
    def __init__(self, config: Config):
        self.config = config
        device = apply_placement(config.placement_of_mode.target)
        self.model, path = target_model(config, device)  # one device, or tensor-parallel over several
        self.inbox = open_inbox(config, "verify")
        self._early: list = []  # what arrived while start-up waited for the draft (_wait_for_quiet_draft)
        self._draft_quiet = False  # the draft worker said it had loaded (its first DraftIdle)
        self.to_server = open_outbox(config, "server")
        self.draft, self.transport = make_draft_source(config, lambda: open_outbox(config, "draft"))
        self.engine = VerifyEngine(
            self.model,
            self.draft,
            max_model_len=config.scheduler.max_model_len,
            max_running=config.scheduler.max_running_requests,
            device=device,
            grammars=Grammars(path, self.model.args.vocab_size),
            max_batch_size=config.scheduler.max_batch_size,
            max_tokens_per_step=config.scheduler.max_tokens_per_step,
            prefill_chunk=config.scheduler.prefill_chunk_tokens,
            prefix_caching=config.scheduler.prefix_caching,
            adaptive=config.speculation.adaptive,
            borrow_cores=self._borrowed_cores(),
        )
        if self.engine.policy is not None:
            self._measure_pass_costs(config.server.startup_timeout_s)
        self.control: queue.Queue = queue.Queue()
        self._last_status = (-1, -1)
        self._started = time.monotonic()
        self._last_stats = 0.0

    def _measure_pass_costs(self, timeout_s: float) -> None:
        """Seed adaptive speculation's costs with passes timed on quiet cores: the target's once a
        draft worker has loaded, then the draft's (TimeDraftPasses), one after the other. Timed
        as it loaded beside the target, a 1-request draft pass took 51 ms where it takes 5."""
        if self.transport is not None and not self._draft_quiet:
            self._draft_quiet = self._wait_for_quiet_draft(timeout_s)
        measured = self.engine.measure_pass_costs()
        draft = None
        if self.transport is not None and self.transport.send(TimeDraftPasses()):
            draft = self._wait_for(DraftPassCosts, min(timeout_s, DRAFT_TIMING_TIMEOUT_S), keep=False)
            if draft is not None:
                self.engine.seed_draft_costs(draft.passes)
        log.info("adaptive speculation: target passes timed at %s tokens, draft passes at %s requests",
                 measured, [n for n, _ in draft.passes] if draft is not None else "none")

    def _borrowed_cores(self) -> BorrowedCores | None:
        """placement.<mode>.borrow_draft_cores, where the target gives the same bits on both teams."""
        placement = self.config.placement_of_mode
        if not placement.borrow_draft_cores:
            return None
        cores = BorrowedCores(placement.target, placement.draft)
        if cores.wide == cores.narrow:
            return None
        self._draft_quiet = self._wait_for_quiet_draft(self.config.server.startup_timeout_s)
        if not self._draft_quiet:
            log.warning("not borrowing the draft's cores: the draft worker did not say it had loaded")
            return None
        if not cores.probe(self.model):
            log.warning("not borrowing the draft's cores: the target's logits differ on %d and %d threads "
                        "(outputs would depend on the load)", cores.narrow[1], cores.wide[1])
            return None
        if cores.wide_share.lowest >= placement.borrow_max_share:
            log.warning("not borrowing the draft's cores: a pass on them too takes %s one on the target's own "
                        "(placement.%s.borrow_max_share: %g)", cores.wide_share, self.config.mode.name,
                        placement.borrow_max_share)
            return None
        log.info("borrowing the draft's cores %s in steps without drafts (a pass there takes %s)",
                 list(cores.wide[0]), cores.wide_share)
        return cores

    def _wait_for_quiet_draft(self, timeout_s: float) -> bool:
        """Wait for the draft worker's word that it has loaded (its first DraftIdle), so that a
        pass on its cores is timed on quiet cores: timed while the draft still loaded there, the
        tiny pair's wide pass took 1.3-3.7x a narrow one and borrowing was turned down, where it
        takes 0.7x. What arrives meanwhile is kept for the reader thread."""
        return self._wait_for(DraftIdle, timeout_s, keep=True) is not None

    def _wait_for(self, kind: type, timeout_s: float, keep: bool):
        """The first message of this kind to arrive within timeout_s (None if none did), at
        start-up; every other message that arrives meanwhile is kept for the reader thread,
        and this one too where `keep`."""
        deadline = time.monotonic() + timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            decoded = self.inbox.recv(timeout_ms=max(1, int(left_s * 1000)))
            if decoded is None:
                break
            found = isinstance(decoded.message, kind)
            if keep or not found:
                self._early.append(decoded)
            if found:
                return decoded.message
        return None

    def _read_inbox(self) -> None:
        for decoded in self._early:
            self._route(decoded)
        while True:
            self._route(self.inbox.recv())

    def _route(self, decoded) -> None:
        """Draft tokens and DraftIdle to the draft stream, in order; the rest to the engine loop."""
        message = decoded.message
        if isinstance(message, (DraftTokens, DraftIdle)) and self.transport is not None:
            self.transport.arrived.put(message)  # DraftIdle: news of the draft, in order with its tokens
        else:
            self.control.put(message)

    def _handle(self, message) -> None:
        if isinstance(message, GenerateRequest):
            try:
                self.engine.add(message)
            except RequestRejected as exc:
                self.to_server.send(RequestFailed(message.request_id, str(exc)))
        elif isinstance(message, AbortRequest):
            self.engine.abort(message.request_id)
        elif isinstance(message, DraftPass):
            self.engine.observe_draft_pass(message.tokens, message.seconds)
        elif isinstance(message, DraftAvailability) and isinstance(self.draft, DraftStream):
            log.warning("draft worker %s", "is back" if message.available else "is down: running target-only")
            self.draft.set_available(message.available, self.engine.run_ahead)
        else:
            log.warning("verify worker ignores unexpected %s", type(message).__name__)

    def _report(self) -> None:
        status = (self.engine.num_running, self.engine.num_waiting)
        if status != self._last_status:
            self._last_status = status
            self.to_server.send(EngineStatus(*status))
        now = time.monotonic()
        if now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            self.to_server.send(
                WorkerStats(
                    "verify",
                    self.engine.busy_s,
                    now - self._started,
                    stale_drafts=self.draft.num_stale,
                    draft_wait_s=self.draft.wait_s,
                    kv_cache_usage=self.engine.kv_cache_usage,
                    iteration_tokens=self.engine.iteration_tokens,
                    batch_sizes=self.engine.batch_sizes,
                    prefix_cache_queries=self.engine.prefix_cache_queries,
                    prefix_cache_hits=self.engine.prefix_cache_hits,
                    wide_steps=self.engine.wide_steps,
                )
            )

    def run(self) -> None:
        threading.Thread(target=self._read_inbox, name="verify-inbox", daemon=True).start()
        start_heartbeat(self.config, "verify", self.config.target.path, self.model.args.vocab_size)
        self._started = time.monotonic()
        while True:
            try:
                # block only when idle (waking for stats); otherwise take what has arrived and go on
                timeout = STATS_INTERVAL_S if not self.engine.has_work else 0
                self._handle(self.control.get(timeout=timeout) if timeout else self.control.get_nowait())
                while True:
                    self._handle(self.control.get_nowait())
            except queue.Empty:
                pass
            self._report()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug in one round must not take the server down
                log.exception("round failed")
                for request_id in self.engine.abort_all():
                    self.to_server.send(RequestFailed(request_id, f"engine error: {exc}"))
                continue
            for output in outputs:
                self.to_server.send(output)


def run(config: Config) -> None:
    VerifyWorker(config).run()


def main(argv: list[str] | None = None) -> None:
    become_worker("verify")
    run(worker_args("verify", argv))


if __name__ == "__main__":
    main()
