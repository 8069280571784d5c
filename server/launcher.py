"""Start the workers, wait for their handshake, serve HTTP, stop everything.

The launcher is the server process: it owns the worker processes, marks the
backend unhealthy the moment one dies, and stops them all on exit (and the
workers die with it in any case: see workers.shell.become_worker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from configs.loader import Config, config_to_dict
from protocol.curve import keys_for
from protocol.messages import DraftAvailability, Message, WorkerReady
from server import external
from server.backend import WorkerBackend

log = logging.getLogger("tandem.launcher")


class LaunchError(RuntimeError):
    """The server could not start (a worker failed, a bad model pair...)."""


# How long an OpenMP thread spins for work before it sleeps, where worker processes share cores
# (libgomp's GOMP_SPINCOUNT; its default, 300,000 spins, keeps an idle team's threads busy on
# the cores the other worker then needs). Measured here (default pair, sd, both workers with
# 2 threads on the same 2 cores, python -m bench.load): 16 clients 159 -> 213 output tokens/s
# against 1 thread each, 1 client 70 -> 73; spinning unlimited (no setting) 199 / 60.
# The cost (session 19, the 2-core AVX512-BF16 machine, where the default target runs bf16
# layer by layer: hundreds of oneDNN calls a pass with Python between them): the target's own
# threads sleep between its calls, so an sd step of 16 rows without drafts took 46-55 ms where
# ar's takes 32 (step logs, py-spy). With the verify worker at libgomp's default (300,000, the
# draft kept at 10,000) sd at 16 clients gave 210-212 tokens/s against 152-176, but 1 client
# 41-65 against 58-75 (4 runs each; in 2 of the 4 its plans stopped drafting): not taken.
# Nor for a target that borrows the draft's core (amusd), though after a wide step its idle pool
# thread, re-pinned onto the target's own core, spins there against the next narrow pass (the
# Qwen target's 1-row pass 36-60 ms right after a wide one, 31-35 otherwise): with the short spin
# the Qwen pair's amusd gave 45.6 and 48.5 tokens/s at 1 client against 40.6 and 41.2, but the
# default pair's at 16 clients 213 and 215 against 333 and 284 (session 21, alternated). Nor
# does pricing the switch into every wide step pay (the probe then turned borrowing down for
# the default pair: 200 at 16 clients), wide steps under load coming one after another.
SHARED_CORES_SPINCOUNT = "10000"


def openmp_env(config: Config) -> dict[str, str]:
    """Environment for the workers' OpenMP runtime: a short spin where a worker's thread team
    shares CPU cores with the other worker's (neither sleeps while the other runs). Nothing
    when the user set GOMP_SPINCOUNT or OMP_WAIT_POLICY, or when the workers' cores are apart."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ or not config.mode.drafts:
        return {}
    placement = config.placement_of_mode
    roles = [placement.target, placement.draft]
    if any(p.device != "cpu" for p in roles):
        return {}
    everywhere = set(range(os.cpu_count() or 1))
    target_cores, draft_cores = (set(p.cores) or everywhere for p in roles)
    teams = any((p.threads or len(p.cores) or len(everywhere)) > 1 for p in roles)
    return {"GOMP_SPINCOUNT": SHARED_CORES_SPINCOUNT} if teams and target_cores & draft_cores else {}


class WorkerProcess:
    def __init__(self, role: str, config: Config):
        self.role = role
        self.command = [sys.executable, "-m", f"workers.{role}", "--config-json", json.dumps(config_to_dict(config))]
        self.env = openmp_env(config)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        # the worker checks that its parent is this pid (workers.shell.become_worker)
        self.process = subprocess.Popen(
            self.command, env={**os.environ, **self.env, "TANDEM_LAUNCHER_PID": str(os.getpid())}
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LaunchedBackend(WorkerBackend):
    """The backend client, plus the workers' ready handshakes and heartbeats.

    `ready[role]` is the latest WorkerReady of the role (workers repeat it every
    second), `last_seen[role]` when it arrived (time.monotonic()). A worker
    started for another mode than `mode` is refused (logged once).
    """

    def __init__(self, *args, mode: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.ready: dict[str, WorkerReady] = {}
        self.last_seen: dict[str, float] = {}
        self._refused: set[str] = set()

    def on_other_message(self, message: Message) -> None:
        if isinstance(message, WorkerReady):
            self._on_ready(message)
        else:
            super().on_other_message(message)

    def _on_ready(self, message: WorkerReady) -> None:
        if self.mode and message.mode and message.mode != self.mode:
            if message.instance not in self._refused:
                self._refused.add(message.instance)
                log.error(
                    "refused a %s worker (pid %d) started for mode %s: this server serves %s; start it with --mode %s",
                    message.role, message.pid, message.mode, self.mode, self.mode,
                )
            return
        known = self.ready.get(message.role)
        if known is None or known.instance != message.instance:
            log.info("%s worker ready (pid %d)", message.role, message.pid)
        self.ready[message.role] = message
        self.last_seen[message.role] = time.monotonic()

    def vocab_mismatch(self) -> str | None:
        """Why the ready draft and verify workers cannot be paired, or None."""
        target, draft = self.ready.get("verify"), self.ready.get("draft")
        if target is not None and draft is not None and draft.vocab_size != target.vocab_size:
            return f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size})"
        return None


@dataclass(frozen=True)
class PreparedModels:
    target_path: Path
    draft_path: Path | None
    tokenizer: object
    eos_token_ids: tuple[int, ...]


def prepare_models(config: Config, announce: Callable[[str], None]) -> PreparedModels:
    """Convert checkpoints once (with progress) and refuse a mismatched pair."""
    from workers.model.checkpoints import check_same_tokenizer, load_tokenizer, resolve_checkpoint

    target_path = resolve_checkpoint(config.target.path, progress=announce)
    tokenizer = load_tokenizer(target_path)
    draft_path = None
    if config.mode.drafts:
        draft_path = resolve_checkpoint(config.draft.path, progress=announce)
        if draft_path != target_path:
            try:
                check_same_tokenizer(tokenizer, load_tokenizer(draft_path))
            except ValueError as exc:
                raise LaunchError(f"the draft and target models cannot be paired: {exc}") from None
    return PreparedModels(target_path, draft_path, tokenizer, eos_token_ids(target_path, tokenizer))


# Special tokens that end a generation wherever they appear in a vocabulary (llama.cpp's
# end-of-generation set): a GGUF names one EOS (Qwen's <|im_end|>), but a completion ends
# with <|endoftext|>, which the Hugging Face generation_config would also list.
END_OF_GENERATION_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>")


def eos_token_ids(model_path: Path, tokenizer) -> tuple[int, ...]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token_id, token in tokenizer.added_tokens_decoder.items():
        if token.special and token.content in END_OF_GENERATION_TEXTS:
            ids.add(token_id)
    for name in ("config.json", "generation_config.json"):
        file = model_path / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return tuple(sorted(ids))


async def _wait_ready(
    backend: LaunchedBackend, workers: list[WorkerProcess], waiting: dict[str, str], timeout_s: float, announce
) -> None:
    """Wait for every role's WorkerReady: the local `workers` and the external
    roles in `waiting` (role -> the message that says why it did not connect)."""
    deadline = time.monotonic() + timeout_s
    announce(f"starting workers: {', '.join(f'{w.role} (pid {w.pid})' for w in workers) or 'none'}")
    roles = [w.role for w in workers] + list(waiting)
    while not all(role in backend.ready for role in roles):
        for worker in workers:
            if worker.exit_code is not None:
                raise LaunchError(f"{worker.role} worker exited with code {worker.exit_code} during start-up")
        if time.monotonic() > deadline:
            missing = [role for role in roles if role not in backend.ready]
            raise LaunchError("; ".join(waiting.get(role, f"{role} worker not ready after {timeout_s:.0f} s") for role in missing))
        await asyncio.sleep(0.05)
    mismatch = backend.vocab_mismatch()
    if mismatch:
        raise LaunchError(mismatch)


class Supervisor:
    """Watches the workers; restarts one that dies, with a growing delay.

    A dead verify worker fails its in-flight requests and makes /health 503
    until its replacement is ready. A dead draft worker only turns speculation
    off: the verify worker runs target-only (lossless) until the draft is back.
    """

    MAX_DELAY_S = 30.0

    def __init__(
        self,
        backend: LaunchedBackend,
        workers: list[WorkerProcess],
        config: Config,
        external_roles: tuple[str, ...] = (),
    ):
        self.backend = backend
        self.workers = workers
        self.external_roles = external_roles  # run elsewhere, watched by heartbeats (server.external)
        self.delay_s = config.server.restart_delay_s
        self.ready_timeout_s = config.server.startup_timeout_s
        self.heartbeat_timeout_s = config.server.heartbeat_timeout_s

    async def run(self) -> None:
        await asyncio.gather(
            *(self._watch(worker) for worker in self.workers),
            *(
                external.watch(self.backend, role, self.heartbeat_timeout_s, self._went_down, self._back)
                for role in self.external_roles
            ),
        )

    async def _watch(self, worker: WorkerProcess) -> None:
        while True:
            while worker.exit_code is None:
                await asyncio.sleep(0.2)
            await self._went_down(worker.role, f"{worker.role} worker (pid {worker.pid}) exited with code {worker.exit_code}")
            delay = self.delay_s
            while True:
                await asyncio.sleep(delay)
                self.backend.ready.pop(worker.role, None)
                worker.start()
                self.backend.restarts[worker.role] = self.backend.restarts.get(worker.role, 0) + 1
                log.warning("restarted the %s worker (pid %d)", worker.role, worker.pid)
                if await self._came_up(worker):
                    break
                worker.stop()
                delay = min(2 * delay, self.MAX_DELAY_S)
            await self._back(worker.role)

    async def _went_down(self, role: str, reason: str) -> None:
        log.error(reason)
        if role == "verify":
            self.backend.set_unhealthy(reason)
        else:
            await self.backend.send_control(DraftAvailability(False))

    async def _came_up(self, worker: WorkerProcess) -> bool:
        """The new process is ready (its own WorkerReady: a late heartbeat of the dead one is not)."""
        deadline = time.monotonic() + self.ready_timeout_s
        while getattr(self.backend.ready.get(worker.role), "pid", None) != worker.pid:
            if worker.exit_code is not None or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _back(self, role: str) -> None:
        if role == "verify":
            self.backend.set_healthy()
        else:
            await self.backend.send_control(DraftAvailability(True))
        log.warning("%s worker is back", role)


async def serve(
    config: Config,
    announce: Callable[[str], None] = print,
    *,
    api_key: str | None = None,
    request_timeout_s: float | None = None,
    external_roles: tuple[str, ...] = (),
    config_file: str = "CONFIG",
) -> None:
    """Run the whole server until SIGINT/SIGTERM.

    The HTTP server listens from the start: while the models load and the
    workers start, every request (/health included) is answered 503 with the
    stage (server.middleware.StartingGate); then the app takes over. The
    `external_roles` are not started here: they connect from elsewhere (`tandem
    worker`, server.external); `config_file` only goes into the messages that
    say how to start them.
    """
    import uvicorn

    from server.middleware import RequestIdMiddleware, StartingGate

    config = config.with_addresses()
    try:
        curve = keys_for(config.curve)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    gate = StartingGate("loading models")
    # uvicorn re-raises the signal that stopped it once it is done: make
    # SIGTERM an exception then, so the `finally` below still stops the workers
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    uvicorn_config = uvicorn.Config(
        RequestIdMiddleware(gate),
        host=config.server.host,
        port=config.server.port,
        log_level="warning",
        log_config=None,  # uvicorn's loggers go through the process's handler (request ids)
        access_log=config.server.access_log,
        lifespan="off",
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
    )
    if config.server.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(uvicorn_config)
    startup = _Startup(config, gate, server, announce, curve=curve, external_roles=external_roles, config_file=config_file,
                       api_key=api_key, request_timeout_s=request_timeout_s)
    starting = asyncio.create_task(startup.run())
    try:
        await server.serve()  # until a signal, or until a failed start-up stops it
    finally:
        starting.cancel()
        await startup.stop()
    if startup.error is not None:
        raise startup.error


class _Startup:
    """Loads the models and starts the workers while uvicorn already answers
    (503 through the gate); opens the gate once the workers are ready. A
    failure stops uvicorn and is kept in `error` for serve() to raise."""

    def __init__(self, config: Config, gate, server, announce, *, curve, external_roles: tuple[str, ...],
                 config_file: str, **app_options):
        self.config, self.gate, self.server, self.announce = config, gate, server, announce
        self.external_roles, self.config_file = external_roles, config_file
        self.app_options = app_options
        self.backend = LaunchedBackend(
            config.addresses.bind_of("server"),
            config.addresses.verify,
            max_pending=config.scheduler.max_running_requests + config.scheduler.max_waiting_requests,
            curve=curve,
            mode=config.speculation.mode,
        )
        self.workers = [WorkerProcess(role, config) for role in config.mode.roles if role not in external_roles]
        if self.workers and self.workers[0].env:
            log.info("the workers' thread teams share cores: %s", " ".join(f"{k}={v}" for k, v in self.workers[0].env.items()))
        self.supervisor: asyncio.Task | None = None
        self.error: LaunchError | None = None

    async def run(self) -> None:
        try:
            await self._start()
        except LaunchError as exc:
            self.error = exc
            self.server.should_exit = True

    async def _start(self) -> None:
        from server.app import create_app
        from server.serving import AppSettings

        config = self.config
        models = await asyncio.to_thread(prepare_models, config, self.announce)
        await self.backend.start()
        roles = [w.role for w in self.workers] + [f"{role} (external)" for role in self.external_roles]
        self.gate.stage = f"starting the workers ({', '.join(roles)})"
        for worker in self.workers:
            worker.start()
        timeout_s = config.server.startup_timeout_s
        waiting = {role: external.not_connected_message(role, config, self.config_file, timeout_s)
                   for role in self.external_roles}
        for role in self.external_roles:
            self.announce(external.waiting_message(role, config, self.config_file, timeout_s))
        for role, message in external.rank_messages(config, self.config_file, timeout_s).items():
            self.announce(message)
            waiting.setdefault(role, message)  # the timeout then says why
        await _wait_ready(self.backend, self.workers, waiting, timeout_s, self.announce)
        self.backend.set_healthy()
        self.supervisor = asyncio.create_task(Supervisor(self.backend, self.workers, config, self.external_roles).run())
        names = config.served_model_names
        settings = AppSettings(
            model_name=names[0],
            model_aliases=names[1:],
            max_model_len=config.scheduler.max_model_len,
            eos_token_ids=models.eos_token_ids,
            allowed_origins=config.server.allowed_origins,
            **self.app_options,
        )
        self.gate.open(create_app(self.backend, models.tokenizer, settings))
        while not self.server.started:
            await asyncio.sleep(0.05)
        self.announce(f"Tandem ready ({config.speculation.mode}): http://{config.server.host}:{config.server.port}/v1")

    async def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.cancel()
        for worker in self.workers:
            worker.stop()
        await self.backend.close()
        self.announce("stopped")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
