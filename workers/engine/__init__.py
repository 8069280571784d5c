"""The engine loops, apart from their process and socket shells.

`VerifyEngine` owns the truth (the verified tokens) and runs rounds; a
`DraftSource` supplies each round's draft tokens (none in mode `ar`; a
`DraftStream` fed by a draft in `sd` and `amusd`). `DraftEngine` is the draft
side: per-request continuations, rollback, drafting. Both run in-process in
tests and inside worker processes in production.
"""

from workers.engine.draft_engine import DraftControl, DraftEngine  # noqa: F401
from workers.engine.draft_model import DraftModel, PlainDraft  # noqa: F401
from workers.engine.draft_source import DraftSource, DraftStream, NoDraft, Proposal  # noqa: F401
from workers.engine.verify_engine import RequestRejected, VerifyEngine  # noqa: F401
