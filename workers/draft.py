"""The draft worker process: the draft model and its per-request caches.

    python -m workers.draft --config-json '{...}'   (started by the launcher)
"""

from __future__ import annotations

import logging
import os

from configs.loader import Config
from protocol.messages import DraftProposal, DraftRequest, ReleaseRequest, WorkerReady
from protocol.sockets import Inbox, Outbox
from workers.engine import DraftEngine
from workers.shell import apply_placement, become_worker, load_worker_model, worker_args

log = logging.getLogger("tandem.draft")


class DraftWorker:
    def __init__(self, config: Config):
        self.config = config
        device = apply_placement(config.placement_for(config.speculation.mode).draft)
        self.model, _ = load_worker_model(config.draft, device)
        self.engine = DraftEngine(
            self.model,
            max_model_len=config.engine.max_model_len,
            max_requests=config.engine.max_running_requests,
            device=device,
        )
        self.inbox = Inbox(config.addresses.draft)
        self.to_verify = Outbox(config.addresses.verify)
        self.to_server = Outbox(config.addresses.server)

    def _handle(self, message) -> None:
        if isinstance(message, DraftRequest):
            try:
                token_ids, probs = self.engine.draft(message)
            except Exception:  # answer anyway: the verifier then runs the round target-only
                log.exception("drafting failed for %s", message.request_id)
                token_ids, probs = [], None
            arrays = [] if probs is None else [probs.float().cpu().numpy()]
            self.to_verify.send(DraftProposal(message.request_id, message.round_id, token_ids, bool(arrays)), arrays)
        elif isinstance(message, ReleaseRequest):
            self.engine.release(message.request_id)
        else:
            log.warning("draft worker ignores unexpected %s", type(message).__name__)

    def run(self) -> None:
        args = self.model.args
        self.to_server.send(
            WorkerReady("draft", os.getpid(), self.config.draft.path, args.vocab_size, self.config.engine.max_model_len)
        )
        while True:
            self._handle(self.inbox.recv().message)


def main(argv: list[str] | None = None) -> None:
    become_worker("draft")
    config = worker_args("draft", argv)
    DraftWorker(config).run()


if __name__ == "__main__":
    main()
