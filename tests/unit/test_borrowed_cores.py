"""A target borrowing the idle draft's cores (workers/shell.py BorrowedCores, and the verify
engine's wide steps): every thread re-pinned, the same bits on both teams, and a step wide
only while the draft has nothing to do."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from configs.loader import DevicePlacement
from tests.unit.test_engine import PROMPTS, make_engine, models, request, run
from workers.model import load_model
from workers.engine.speculation_policy import WideShare
from workers.shell import BorrowedCores

__all__ = ["models"]  # the module-scoped fixture, shared with test_engine

needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="borrowing needs two cores")


@pytest.fixture
def restored_placement():
    """Put every thread's cores and torch's thread count back afterwards."""
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield sorted(cores)
    for task in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(task), cores)
        except ProcessLookupError:
            pass
    torch.set_num_threads(threads)


def thread_cores() -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(task))) for task in os.listdir("/proc/self/task")}


@needs_two_cores
def test_widening_repins_every_thread_and_narrowing_restores(restored_placement):
    """Catches only the calling thread re-pinned (an OpenMP pool thread keeps its old core, so
    a wide team runs two threads on one core) and a narrow step left with the wide team."""
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    borrowed(False)  # narrowing from a fresh state does nothing
    borrowed(True)
    assert thread_cores() == {frozenset({own, other})} and torch.get_num_threads() == 2
    torch.ones(256, 256) @ torch.ones(256, 256)  # the pool's threads exist now
    borrowed(False)
    assert thread_cores() == {frozenset({own})} and torch.get_num_threads() == 1


@needs_two_cores
def test_probe_finds_the_model_the_same_on_both_teams(restored_placement, tmp_path):
    """The tiny float32 model gives the same bits on 1 and 2 threads, and its pass time ratio
    is measured. Catches a probe that compares nothing (a wide pass never run)."""
    from tests.tiny_model import make_tiny_checkpoint

    model = load_model(make_tiny_checkpoint(tmp_path, vocab_size=256, seed=0), dtype=torch.float32)
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    assert borrowed.probe(model)
    assert [rows for rows, _ in borrowed.wide_share.points] == [1, 8]  # a lone request's pass and a batch's
    assert borrowed.wide_share.lowest > 0 and not borrowed.widened


class ProbedModel:
    """What BorrowedCores.probe needs of a model, without one: a device, a vocabulary, a cache."""

    device = torch.device("cpu")
    args = SimpleNamespace(vocab_size=8)

    def new_cache(self, max_len):
        return SimpleNamespace(crop=lambda n: None)


class ThreadCountModel(ProbedModel):
    """Logits that depend on the thread count, as a kernel that splits its sums by thread would."""

    def forward_batch(self, segments):
        return [torch.full((s.num_logits, 8), float(torch.get_num_threads())) for s in segments]


@needs_two_cores
def test_probe_refuses_a_model_whose_bits_depend_on_the_team(restored_placement):
    """Catches borrowing with a thread-variant target: a request's tokens would then depend on
    which of its steps ran wide, i.e. on the load."""
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    assert not borrowed.probe(ThreadCountModel())


class SleepingModel(ProbedModel):
    """A pass that sleeps: `slow_calls` first passes take `slow_s` (the server still loading beside
    the probe), then `narrow_s` on one thread and `wide_s` on more."""

    def __init__(self, narrow_s: float, wide_s: float, slow_calls: int = 0, slow_s: float = 0.0):
        self.narrow_s, self.wide_s, self.slow_calls, self.slow_s = narrow_s, wide_s, slow_calls, slow_s
        self.calls = 0

    def forward_batch(self, segments):
        self.calls += 1
        slow = self.calls <= self.slow_calls
        time.sleep(self.slow_s if slow else self.narrow_s if torch.get_num_threads() == 1 else self.wide_s)
        return [torch.zeros(s.num_logits, 8) for s in segments]


@needs_two_cores
def test_probe_times_the_teams_alternated(restored_placement):
    """A pass taking as long on either team, slowed at first (start-up): the share is about 1.
    Catches timing all narrow passes first: the slow start then fell on the narrow team only
    and a wide pass looked many times faster (amusd then ran most steps wide)."""
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    assert borrowed.probe(SleepingModel(0.02, 0.02, slow_calls=10, slow_s=0.1))  # long enough for sleep jitter
    assert all(0.8 < share < 1.25 for _, share in borrowed.wide_share.points), borrowed.wide_share


class OnceLuckyModel(SleepingModel):
    """Wide passes take 0.75 of a narrow one's time, except one that is ten times faster (the
    machine quiet for a moment)."""

    wide_single_rows = 0

    def forward_batch(self, segments):
        if torch.get_num_threads() > 1 and segments[0].num_logits == 1:
            self.wide_single_rows += 1
            if self.wide_single_rows == 2:
                time.sleep(self.wide_s / 10)
                return [torch.zeros(s.num_logits, 8) for s in segments]
        return super().forward_batch(segments)


@needs_two_cores
def test_one_lucky_pass_does_not_set_the_wide_share(restored_placement):
    """Catches a share from the fastest pass of each team: one lucky wide pass then priced every
    wide step at a fraction of its time (0.50 at 1 row, where it takes 0.72, in a real start)."""
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    assert borrowed.probe(OnceLuckyModel(0.02, 0.015))
    assert all(0.6 < share < 0.95 for _, share in borrowed.wide_share.points), borrowed.wide_share


@needs_two_cores
def test_the_wide_share_is_no_lower_than_perfect_scaling(restored_placement):
    """Two threads cannot make a pass more than twice as fast: a share measured lower (noise on
    the narrow timings) is taken at 0.5. Catches a wide step priced below what its cores allow."""
    own, other = restored_placement[:2]
    borrowed = BorrowedCores(DevicePlacement(cores=(own,), threads=1), DevicePlacement(cores=(other,), threads=1))
    assert borrowed.probe(SleepingModel(0.02, 0.002))
    assert [share for _, share in borrowed.wide_share.points] == [0.5, 0.5]


class Recorder:
    """A CoreBorrowing that records each step's team, and whether the in-process draft had
    anything to do when the step went wide."""

    wide_share = WideShare(((1, 0.5),))

    def __init__(self, engine):
        self.draft = engine.draft.transport.engine
        self.draft.catch_up = False  # as the draft worker's, whose cores are borrowed
        self.calls: list[bool] = []
        self.wide_while_drafting = 0

    def __call__(self, wide: bool) -> None:
        self.calls.append(wide)
        self.wide_while_drafting += wide and self.draft.has_work


def borrowing_engine(models):
    engine = make_engine(models["target"], models["quantized"], k=4, mode="amusd", run_ahead=8)
    engine.borrow_cores = Recorder(engine)
    return engine


def test_engine_borrows_only_while_the_draft_idles(models):
    """amusd, in-process: requests that take no drafts (their own cap of 0) make every step
    after admission wide; one request that drafts beside them keeps the steps narrow until it
    ends; text is ar's throughout. Catches a wide step while the draft drafts (its core taken)
    and borrowing that never happens."""
    ar = run(make_engine(models["target"]), [request(i, p) for i, p in enumerate(PROMPTS[:2])] + [request(2, PROMPTS[3])])

    engine = borrowing_engine(models)
    no_drafts = [request(i, p) for i, p in enumerate(PROMPTS[:2])]
    for r in no_drafts:
        r.num_draft_tokens = 0
    got = run(engine, no_drafts)
    assert all(got[r.request_id][0] == ar[r.request_id][0] for r in no_drafts)
    assert engine.borrow_cores.calls[1:] and all(engine.borrow_cores.calls[1:])  # the first step admits them
    assert engine.wide_steps == sum(engine.borrow_cores.calls)
    assert engine.borrow_cores.wide_while_drafting == 0

    engine = borrowing_engine(models)
    mixed = [*no_drafts, request(2, PROMPTS[3])]  # its prompt is prefilled beside the others' rounds
    for r in mixed:
        engine.add(r)
    texts: dict[str, list[int]] = {r.request_id: [] for r in mixed}
    drafted_wide = drafted_narrow = 0
    while engine.has_work:
        outputs = engine.step()
        drafted = any(o.num_draft_tokens for o in outputs)
        drafted_wide += drafted and engine.borrow_cores.calls[-1]
        drafted_narrow += drafted and not engine.borrow_cores.calls[-1]
        for o in outputs:
            texts[o.request_id] += o.token_ids
    assert all(texts[r.request_id] == ar[r.request_id][0] for r in mixed)
    assert drafted_narrow > 0 and drafted_wide == 0 and engine.borrow_cores.wide_while_drafting == 0
    assert any(engine.borrow_cores.calls)  # the others' steps after the drafting one ended
