"""What every worker process shares: placement, naming, lifetime, model loading.

The verify and draft workers start with `become_worker`; the follower ranks of
a rank group (workers/ranks/group.py: EasySpec's draft ranks, a tensor-parallel
target's ranks) use the same pieces: `name_process`, `die_with_parent`,
`apply_placement`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import statistics
import sys
import threading
import time
import uuid
from functools import cache

import torch
import zmq

from configs.loader import Config, DevicePlacement, ModelConfig, config_from_dict
from protocol.curve import CurveKeys, keys_for
from protocol.messages import WorkerReady
from protocol.sockets import Inbox, Outbox
from workers.engine.speculation_policy import WideShare

log = logging.getLogger(__name__)

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
# The launcher puts its pid here for each worker it starts (server.launcher.WorkerProcess).
LAUNCHER_PID_ENV = "TANDEM_LAUNCHER_PID"
HEARTBEAT_INTERVAL_S = 1.0


def worker_args(role: str, argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog=f"tandem-{role}", description=f"Tandem {role} worker")
    parser.add_argument("--config-json", required=True, help="the launcher's resolved config, as JSON")
    args = parser.parse_args(argv)
    return config_from_dict(json.loads(args.config_json))


def _prctl(option: int, value) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0)
    except OSError:  # not Linux: the parent still stops us on exit
        pass


def name_process(name: str) -> None:
    """The name `ps` and `top` show (15 bytes at most)."""
    _prctl(_PR_SET_NAME, name.encode()[:15])


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies, so nothing is orphaned."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def become_worker(role: str, standalone: bool = False) -> None:
    """Name the process, and die with the launcher so nothing is orphaned.

    A `standalone` worker (`tandem worker`) has no launcher: it outlives its
    parent (a shell, an init) and ends on SIGTERM/SIGINT.

    PR_SET_PDEATHSIG sends us SIGTERM when the launcher dies; it only covers a
    launcher that is still alive when it is set, so then we check that our
    parent is still the launcher whose pid it gave us. Not `getppid() == 1`:
    in a container the launcher itself is PID 1.
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s", stream=sys.stderr)
    name_process(f"tandem-{role}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if standalone:
        return
    die_with_parent()
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and os.getppid() != int(launcher):  # the launcher died before PDEATHSIG was set
        sys.exit(1)


def apply_placement(placement: DevicePlacement) -> torch.device:
    """Pin to the configured cores/threads (CPU) or select the GPU (a DevicePlacement,
    or anything with its fields: device, cores, threads)."""
    if placement.device.startswith("cuda"):
        device = torch.device(placement.device)
        torch.cuda.set_device(device)
        if placement.threads:
            torch.set_num_threads(placement.threads)
        return device
    if placement.cores:
        os.sched_setaffinity(0, placement.cores)
    torch.set_num_threads(placement.threads or len(placement.cores) or torch.get_num_threads())
    return torch.device("cpu")


# rows of the passes BorrowedCores.probe times on both teams: a lone request's step (bound by
# memory, it gains least from more cores) and a verification's or a batch's (more arithmetic)
PROBE_ROWS = (1, 8)
PROBE_ROUNDS = 7  # wide and narrow passes timed back to back for each of PROBE_ROWS


class BorrowedCores:
    """The target's thread team, widened onto the draft's cores for the steps where the draft
    idles (placement.<mode>.borrow_draft_cores) and narrowed back before it drafts again.

    Every thread of the process is re-pinned (an OpenMP pool thread keeps the mask it was
    created with); torch's thread count follows the cores. Only for a model that gives the same
    bits on both teams (`probe`): a request's tokens must not depend on which steps borrowed."""

    def __init__(self, own: DevicePlacement, draft: DevicePlacement):
        self.narrow = (tuple(own.cores), own.threads or len(own.cores))
        wide = tuple(sorted({*own.cores, *draft.cores}))
        self.wide = (wide, len(wide))
        self.widened = False
        self.wide_share = WideShare(((1, 1.0),))  # a wide pass's time over a narrow one's, by rows (probe)

    def __call__(self, wide: bool) -> None:
        if wide == self.widened:
            return
        cores, threads = self.wide if wide else self.narrow
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), cores)
            except ProcessLookupError:  # a thread that has just ended
                pass
        torch.set_num_threads(threads)
        self.widened = wide

    @torch.inference_mode()
    def probe(self, model, rounds: int = PROBE_ROUNDS) -> bool:
        """Whether a prefill and a few-token pass of `model` give the same logits on both teams;
        if so, wide_share is the time of a pass of each of PROBE_ROWS rows wide over narrow: in
        each of `rounds` rounds one pass on each team back to back (whatever else runs then
        falls on both), the median of the rounds' ratios, never below the share of perfect
        scaling (narrow threads over wide ones). Timed all narrow, then all wide, one start gave
        0.45 at 1 row on 1 core against 2, where it takes 0.72 (bench.pass_cost: 42.2 and
        30.2 ms), and amusd's plans ran most steps wide (Qwen pair, 36.2 tokens/s against 46.0);
        the fastest of 3 passes per team, alternated, still gave 0.50-0.79 at 1 row from one
        start to the next, where one lucky pass set it (what that did to amusd's runs is not
        settled: README, "Speculation that adapts to load")."""
        from workers.model.model import Segment

        probe = torch.arange(40, dtype=torch.long, device=model.device) % model.args.vocab_size
        cache = model.new_cache(64)

        def logits() -> list[torch.Tensor]:
            cache.crop(0)
            first = model.forward_batch([Segment(probe[:32], cache, 32)])
            return first + model.forward_batch([Segment(probe[32:], cache, 8)])

        def seconds(team: bool, rows: int) -> float:
            self(team)
            cache.crop(32)
            started = time.perf_counter()
            model.forward_batch([Segment(probe[32 : 32 + rows], cache, rows)])
            return time.perf_counter() - started

        narrow = logits()
        self(True)
        wide = logits()
        ratios = [[seconds(True, rows) / seconds(False, rows) for _ in range(rounds)] for rows in PROBE_ROWS]
        self(False)
        floor = self.narrow[1] / self.wide[1]
        self.wide_share = WideShare(tuple((rows, max(floor, statistics.median(r))) for rows, r in zip(PROBE_ROWS, ratios)))
        return all(torch.equal(a, b) for a, b in zip(narrow, wide))


def load_worker_model(model_config: ModelConfig, device: torch.device):
    from workers.model import load_model, resolve_checkpoint
    from workers.model.dtypes import compute_dtype

    path = resolve_checkpoint(model_config.path, progress=log.info)
    dtype = compute_dtype(model_config.dtype, device, model_config.quantization)
    model = load_model(
        path, dtype=dtype, quantization=model_config.quantization, device=device, head_vocab=model_config.head_vocab
    )
    return model, path  # load_model probed its linears' batch invariance (workers.model.model.TwoRowFloor)


@cache
def _curve_keys(curve) -> CurveKeys | None:
    return keys_for(curve)


def open_inbox(config: Config, process: str) -> Inbox:
    """`process`'s inbox, bound at its bind address (CURVE server if the config says so)."""
    return Inbox(config.addresses.bind_of(process), curve=_curve_keys(config.curve))


def open_outbox(config: Config, peer: str) -> Outbox:
    """A socket to `peer`'s inbox (`peer`: server, verify or draft), as a CURVE client if configured."""
    return Outbox(getattr(config.addresses, peer), curve=_curve_keys(config.curve))


def start_heartbeat(config: Config, role: str, model: str, vocab_size: int) -> WorkerReady:
    """Send WorkerReady to the server now and every HEARTBEAT_INTERVAL_S from a daemon
    thread with its own socket (a long pass does not silence it). Never blocks: while
    the server is unreachable a beat that cannot be queued is dropped."""
    ready = WorkerReady(
        role, os.getpid(), model, vocab_size, config.scheduler.max_model_len,
        mode=config.speculation.mode, instance=uuid.uuid4().hex,
    )
    outbox = open_outbox(config, "server")
    outbox.socket.setsockopt(zmq.SNDHWM, 4)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                outbox.send(ready, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            stop.wait(HEARTBEAT_INTERVAL_S)

    threading.Thread(target=beat, name=f"{role}-heartbeat", daemon=True).start()
    return ready
