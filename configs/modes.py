"""The table of speculation modes: the one place a mode's name turns into behaviour.

Every reader (the config loader, the launcher, the verify and draft workers,
the CLI, the benchmark) looks a mode up here; adding a mode means adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    drafts: bool  # a draft worker runs beside the verify worker
    # a round waits for k drafts (draft, then verify); False: the draft runs
    # ahead while the target verifies and a round takes what has arrived
    synchronous: bool
    layer_parallel_draft: bool  # the draft's layers run on several ranks (EasySpec)
    # drafts from prompt lookup: n-gram matches in the request's own tokens, no model
    # (workers/engine/prompt_lookup.py); with `drafts` too, the draft model fills in
    # where no n-gram matches
    lookup: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        """The worker processes the launcher starts."""
        return ("verify", "draft") if self.drafts else ("verify",)


_TABLE = (
    Mode("ar", drafts=False, synchronous=True, layer_parallel_draft=False),
    Mode("sd", drafts=True, synchronous=True, layer_parallel_draft=False),
    Mode("amusd", drafts=True, synchronous=False, layer_parallel_draft=False),
    Mode("easyspec", drafts=True, synchronous=True, layer_parallel_draft=True),
    Mode("amusd+easyspec", drafts=True, synchronous=False, layer_parallel_draft=True),
    Mode("lookup", drafts=False, synchronous=True, layer_parallel_draft=False, lookup=True),
    Mode("sd+lookup", drafts=True, synchronous=True, layer_parallel_draft=False, lookup=True),
)

MODES: dict[str, Mode] = {mode.name: mode for mode in _TABLE}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
BASELINE = MODES["ar"].name  # the mode every speed is a ratio to


def mode_of(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r} (modes: {', '.join(MODE_NAMES)})") from None
