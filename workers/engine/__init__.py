"""The engine loops, apart from their process and socket shells.

`VerifyEngine` owns the truth (the verified tokens) and runs rounds; a
`DraftSource` proposes tokens for a round (none in mode `ar`, a draft worker in
`sd`). `DraftEngine` is the draft side: per-request caches, rollback, drafting.
Both run in-process in tests, and inside worker processes in production.
"""

from workers.engine.draft_engine import DraftEngine  # noqa: F401
from workers.engine.draft_source import DraftSource, LocalDraft, NoDraft, Proposal  # noqa: F401
from workers.engine.verify_engine import VerifyEngine  # noqa: F401
