"""Where a round's draft tokens come from: the seam between modes.

A mode (a row of configs/modes.py) is a choice of DraftSource:
- `NoDraft`: a mode without a draft (`ar`), the target alone.
- `DraftStream` for a synchronous mode (`sd`, `easyspec`): the draft may run k
  tokens past each verified prefix; a round waits for those k.
- `DraftStream` for an asynchronous mode (`amusd`, `amusd+easyspec`): the draft
  runs ahead up to its limit while the target verifies; a round takes whatever
  has arrived (at least one token, unless the draft is silent past the timeout).
- `PromptLookup` (`lookup`) and `LookupFirst` (`sd+lookup`, a DraftStream that
  prefers it): drafts copied from the request's own tokens (workers/engine/prompt_lookup.py).

The stream keeps, per request, the epoch (version) of the verified prefix and
a buffer of draft tokens for the positions right after it. Draft messages of
another epoch are stale and dropped. The transport carries messages to and
from the draft: sockets in production (workers/verify.py), a DraftEngine in
the same process in tests (tests/local_draft.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from configs.modes import Mode
from protocol.messages import BeginDrafting, DraftIdle, DraftTokens, ReleaseRequest, VerifiedPrefix
from workers.engine.request import Request


@dataclass(frozen=True)
class Proposal:
    token_ids: list[int]
    available: int = 0  # drafts that had arrived (before the cap): the run-ahead

    @staticmethod
    def empty() -> "Proposal":
        return Proposal([])


class DraftSource(Protocol):
    num_draft_tokens: int  # most drafts one round verifies
    max_run_ahead: int  # most drafts the draft may hold past a verified prefix
    num_stale: int  # draft tokens dropped for an old epoch
    wait_s: float  # time rounds spent blocked for drafts
    # a round waits for all its drafts (a synchronous mode): the draft's passes add to
    # the step's time; False: the draft runs beside the target
    wait_for_all: bool
    # the draft does not catch up while idle: it feeds what a request missed when it drafts
    # for it again (so its verified tokens are sent then), on that round's path
    holds_back: bool

    def on_admit(self, request: Request, max_run_ahead: int) -> None: ...

    def propose(self, request: Request, num_tokens: int, wait: bool = True) -> Proposal:
        """Up to num_tokens drafts for the request's next round. wait: for drafts not yet
        arrived (all of them in a synchronous mode, one otherwise, up to the timeout); False:
        what has arrived, maybe none."""
        ...

    def on_verified(self, request: Request, emitted: list[int], max_run_ahead: int) -> None: ...

    def release(self, request_id: str) -> None: ...

    def busy(self) -> bool:
        """Whether the draft may still be computing: told something since it last said it had
        nothing to do (DraftIdle). A target that borrows its cores waits until it is not."""
        ...

    def wait_until_idle(self) -> None:
        """Block until the draft is not busy (up to the timeout), counted in wait_s."""
        ...


class NoDraft:
    """Mode `ar`: the target alone."""

    num_draft_tokens = 0
    max_run_ahead = 0
    num_stale = 0
    wait_s = 0.0
    wait_for_all = True
    holds_back = False

    def on_admit(self, request: Request, max_run_ahead: int) -> None:
        pass

    def propose(self, request: Request, num_tokens: int, wait: bool = True) -> Proposal:
        return Proposal.empty()

    def on_verified(self, request: Request, emitted: list[int], max_run_ahead: int) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def busy(self) -> bool:
        return False

    def wait_until_idle(self) -> None:
        pass


class Transport(Protocol):
    def send(self, message) -> bool:
        """Whether the message left for the draft (False: dropped, the draft never hears it)."""
        ...

    def receive(self, timeout_s: float) -> list[DraftTokens | DraftIdle]:
        """Draft messages that arrived (drafts, and DraftIdle), waiting up to timeout_s for at least one."""
        ...


@dataclass
class _Buffer:
    request: Request
    epoch: int
    start: int  # sequence position of token_ids[0]: the number of verified tokens
    token_ids: list[int] = field(default_factory=list)
    told: int = -1  # the run-ahead the draft was last sent
    unsent_from: int = 0  # verified tokens the draft has been sent (with holds_back)
    unsent: list[int] = field(default_factory=list)  # verified tokens after those, not sent yet


class DraftStream:
    def __init__(
        self,
        transport: Transport,
        *,
        num_draft_tokens: int,
        max_run_ahead: int,
        mode: Mode,
        timeout_s: float,
        holds_back: bool = False,
    ):
        """holds_back: the draft does not feed, while it idles, the verified tokens of requests
        told to run none ahead (a synchronous draft; one whose cores the target borrows): such
        tokens are sent when the request is told to draft again, not one message a round
        (measured, amusd, 16 clients with no drafts: 16 messages a step for an idle draft)."""
        self.transport = transport
        self.holds_back = holds_back
        self.num_draft_tokens = num_draft_tokens
        self.max_run_ahead = max_run_ahead
        self.wait_for_all = mode.synchronous
        self.timeout_s = timeout_s
        self._buffers: dict[str, _Buffer] = {}
        self.available = True  # False while the draft worker is down: rounds run target-only
        self.num_stale = 0
        self.wait_s = 0.0  # time rounds spent blocked for drafts (the verifier idle)
        # the draft is busy from a message that may give it work until it says it idles having
        # heard it: messages sent to this draft process, the last that gave it work, and how many
        # it had heard when it last said it idles
        self._sent = self._work_sent = self._idle_heard = 0

    # -- publishing --------------------------------------------------------

    def _send(self, message) -> None:
        """To the draft, unless it is down: nothing piles up for a worker that is gone
        (it may be on another host for long), and one that comes back is begun anew."""
        if self.available and self.transport.send(message):  # a dropped message is not counted:
            self._sent += 1                                  # the draft never hears it, nor says so
            if self._gives_work(message):
                self._work_sent = self._sent

    def _gives_work(self, message) -> bool:
        """Whether the message may set the draft computing: drafting ahead, or (a draft that
        catches up) feeding verified tokens. A request told to run none ahead of a draft that
        holds back costs it no pass."""
        if isinstance(message, ReleaseRequest):
            return False
        return message.max_run_ahead > 0 or not self.holds_back

    def _begin(self, request: Request, buffer: _Buffer, max_run_ahead: int) -> None:
        buffer.told, buffer.unsent_from, buffer.unsent = max_run_ahead, request.num_tokens, []
        self._send(
            BeginDrafting(
                request.request_id,
                buffer.epoch,
                request.tokens,
                max_run_ahead,
                request.sampling,
                num_prompt_tokens=len(request.prompt_ids),
                stop_token_ids=sorted(request.stop_token_ids),
            )
        )

    def set_available(self, available: bool, run_ahead) -> None:
        """The draft went away or came back. A new draft knows nothing: begin
        every request on it again (new epochs) so it starts drafting."""
        was, self.available = self.available, available
        if available and not was:
            self._sent = self._work_sent = self._idle_heard = 0  # a new process has heard nothing
            for buffer in self._buffers.values():
                buffer.token_ids.clear()
                buffer.epoch += 1
                self._begin(buffer.request, buffer, run_ahead(buffer.request))

    def on_admit(self, request: Request, max_run_ahead: int) -> None:
        buffer = _Buffer(request, epoch=0, start=request.num_tokens)
        self._buffers[request.request_id] = buffer
        self._begin(request, buffer, max_run_ahead)

    def on_verified(self, request: Request, emitted: list[int], max_run_ahead: int) -> None:
        """A new verified prefix: new epoch; keep buffered drafts that still agree.
        The draft is sent only the emitted tokens (after the previous prefix)."""
        buffer = self._buffers[request.request_id]
        agree = buffer.token_ids[: len(emitted)] == emitted
        keep = len(emitted) if agree else len(buffer.token_ids)
        del buffer.token_ids[:keep]
        buffer.start = request.num_tokens
        buffer.epoch += 1
        buffer.unsent += emitted
        if self.holds_back and max_run_ahead == 0 and buffer.told == 0:  # it idles for this request, and still will
            return
        self._send(VerifiedPrefix(request.request_id, buffer.epoch, buffer.unsent_from, buffer.unsent, max_run_ahead))
        buffer.told, buffer.unsent_from, buffer.unsent = max_run_ahead, request.num_tokens, []

    def release(self, request_id: str) -> None:
        if self._buffers.pop(request_id, None) is not None:
            self._send(ReleaseRequest(request_id))

    # -- receiving ---------------------------------------------------------

    def _deliver(self, message: DraftTokens) -> None:
        buffer = self._buffers.get(message.request_id)
        if buffer is None or message.epoch != buffer.epoch:
            self.num_stale += len(message.token_ids)
            return
        offset = message.start - buffer.start
        if offset < 0 or offset > len(buffer.token_ids):  # not adjacent to what we hold
            self.num_stale += len(message.token_ids)
            return
        del buffer.token_ids[offset:]
        buffer.token_ids.extend(message.token_ids)

    def _receive(self, timeout_s: float) -> None:
        for message in self.transport.receive(timeout_s):
            if isinstance(message, DraftIdle):
                self._idle_heard = message.heard
            else:
                self._deliver(message)

    def busy(self) -> bool:
        self._receive(0.0)
        return self._idle_heard < self._work_sent and self.available

    def _wait_until(self, done: Callable[[], bool]) -> None:
        """Take in the draft's messages until done() (at most timeout_s), counted in wait_s."""
        started = time.monotonic()
        deadline = started + self.timeout_s
        while not done() and (remaining := deadline - time.monotonic()) > 0:
            self._receive(remaining)
        self.wait_s += time.monotonic() - started

    def wait_until_idle(self) -> None:
        self._wait_until(lambda: not self.busy())

    def propose(self, request: Request, num_tokens: int, wait: bool = True) -> Proposal:
        buffer = self._buffers[request.request_id]
        need = 0 if not wait else num_tokens if self.wait_for_all else 1
        self._receive(0.0)
        if not self.available:
            need = 0
        self._wait_until(lambda: len(buffer.token_ids) >= need)
        available = len(buffer.token_ids)
        return Proposal(buffer.token_ids[:num_tokens], available)

