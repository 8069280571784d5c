"""A DraftEngine driven in the test's own process, in place of a draft worker and its sockets."""

from __future__ import annotations

import random


from protocol.messages import DraftIdle, DraftTokens


class LocalTransport:
    """The DraftStream's transport to a DraftEngine in this process.

    Each `receive` advances the draft by `steps()` batched steps (default 1), each
    drafting a token for every request with room to run ahead: a random `steps`
    stands in for the timing of a draft running on another device.
    """

    def __init__(self, engine, steps=None):
        self.engine = engine
        self.steps = steps or (lambda: 1)
        self._outbox: list[DraftTokens | DraftIdle] = []
        self.heard = 0  # messages taken in (DraftIdle.heard)

    def send(self, message) -> bool:
        self.heard += 1
        self._keep(self.engine.handle(message))
        self._report_idle()
        return True

    def receive(self, timeout_s: float) -> list[DraftTokens | DraftIdle]:
        for _ in range(self.steps()):
            for drafted in self.engine.step_all():
                self._keep(drafted)
            self._report_idle()
        out, self._outbox = self._outbox, []
        return out

    def _report_idle(self) -> None:
        """As the draft worker: DraftIdle once what it was told leaves it nothing to do."""
        if not self.engine.has_work:
            self._outbox.append(DraftIdle(self.heard))

    def _keep(self, drafted) -> None:
        if drafted is not None:
            self._outbox.append(drafted)


def random_steps(seed: int, low: int = 0, high: int = 4):
    """A `steps` function for LocalTransport: how far the draft got, at random."""
    rng = random.Random(seed)
    return lambda: rng.randint(low, high)
