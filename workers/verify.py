"""The verify worker process: the target model and the verify engine.

    python -m workers.verify --config-json '{...}'   (started by the launcher)

A reader thread owns the inbox socket: draft proposals go to the RemoteDraft,
everything else to the engine loop on the main thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import torch

from configs.loader import Config
from protocol.codec import Decoded
from protocol.messages import (
    AbortRequest,
    DraftProposal,
    DraftRequest,
    EngineStatus,
    GenerateRequest,
    ReleaseRequest,
    RequestFailed,
    WorkerReady,
)
from protocol.sockets import Inbox, Outbox
from workers.engine import NoDraft, Proposal, VerifyEngine
from workers.engine.request import Request
from workers.engine.verify_engine import RequestRejected
from workers.shell import apply_placement, become_worker, load_worker_model, worker_args

log = logging.getLogger("tandem.verify")


class RemoteDraft:
    """A DraftSource backed by the draft worker process (mode `sd`).

    Synchronous: send a DraftRequest, wait for the proposal of that round. A
    draft that does not answer in time is skipped (the round runs target-only,
    still lossless); its late reply is recognised by round id and dropped.
    """

    def __init__(self, outbox: Outbox, num_draft_tokens: int, timeout_s: float):
        self.outbox = outbox
        self.num_draft_tokens = num_draft_tokens
        self.timeout_s = timeout_s
        self.replies: queue.Queue[Decoded] = queue.Queue()
        self.num_stale = 0
        self.num_timeouts = 0

    def deliver(self, decoded: Decoded) -> None:
        self.replies.put(decoded)

    def propose(self, request: Request, num_tokens: int) -> Proposal:
        request.round_id += 1
        self.outbox.send(DraftRequest(request.request_id, request.round_id, request.tokens, num_tokens, request.sampling))
        deadline = time.monotonic() + self.timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                decoded = self.replies.get(timeout=remaining)
            except queue.Empty:
                break
            reply: DraftProposal = decoded.message
            if reply.request_id != request.request_id or reply.round_id != request.round_id:
                self.num_stale += 1
                continue
            probs = None
            if reply.has_probs and decoded.arrays:
                probs = torch.from_numpy(decoded.arrays[0].copy())
            return Proposal(list(reply.token_ids), probs)
        self.num_timeouts += 1
        log.warning("draft did not answer within %.1f s: round runs target-only", self.timeout_s)
        return Proposal.empty()

    def release(self, request_id: str) -> None:
        self.outbox.send(ReleaseRequest(request_id))


class VerifyWorker:
    def __init__(self, config: Config):
        self.config = config
        mode = config.speculation.mode
        device = apply_placement(config.placement_for(mode).target)
        self.model, _ = load_worker_model(config.target, device)
        addresses = config.addresses
        self.inbox = Inbox(addresses.verify)
        self.to_server = Outbox(addresses.server)
        if mode == "ar":
            self.draft = NoDraft()
        else:
            self.draft = RemoteDraft(
                Outbox(addresses.draft), config.speculation.num_draft_tokens, config.speculation.draft_timeout_s
            )
        self.engine = VerifyEngine(
            self.model,
            self.draft,
            max_model_len=config.engine.max_model_len,
            max_running=config.engine.max_running_requests,
            device=device,
        )
        self.control: queue.Queue = queue.Queue()
        self._last_status = (-1, -1)

    def _read_inbox(self) -> None:
        while True:
            decoded = self.inbox.recv()
            if isinstance(decoded.message, DraftProposal) and isinstance(self.draft, RemoteDraft):
                self.draft.deliver(decoded)
            else:
                self.control.put(decoded.message)

    def _handle(self, message) -> None:
        if isinstance(message, GenerateRequest):
            try:
                self.engine.add(message)
            except RequestRejected as exc:
                self.to_server.send(RequestFailed(message.request_id, str(exc)))
        elif isinstance(message, AbortRequest):
            self.engine.abort(message.request_id)
        else:
            log.warning("verify worker ignores unexpected %s", type(message).__name__)

    def _send_status(self) -> None:
        status = (self.engine.num_running, self.engine.num_waiting)
        if status != self._last_status:
            self._last_status = status
            self.to_server.send(EngineStatus(*status))

    def run(self) -> None:
        threading.Thread(target=self._read_inbox, name="verify-inbox", daemon=True).start()
        args = self.model.args
        self.to_server.send(
            WorkerReady("verify", os.getpid(), self.config.target.path, args.vocab_size, self.config.engine.max_model_len)
        )
        while True:
            try:
                # block only when idle; otherwise take what has arrived and go on
                message = self.control.get(timeout=None if not self.engine.has_work else 0)
                self._handle(message)
                while True:
                    self._handle(self.control.get_nowait())
            except queue.Empty:
                pass
            self._send_status()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug in one round must not take the server down
                log.exception("round failed")
                for request_id in self.engine.abort_all():
                    self.to_server.send(RequestFailed(request_id, f"engine error: {exc}"))
                continue
            for output in outputs:
                self.to_server.send(output)
            self._send_status()


def main(argv: list[str] | None = None) -> None:
    become_worker("verify")
    config = worker_args("verify", argv)
    VerifyWorker(config).run()


if __name__ == "__main__":
    main()
