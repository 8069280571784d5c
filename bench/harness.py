"""Run the prompts through the real server, one mode after another.

For each mode: start ``tandem serve --mode MODE`` as a subprocess (in its own
process group, stderr/stdout to a log file), poll ``GET /health`` until it
answers 200, send one uncounted warm-up request and then every prompt
sequentially with the OpenAI SDK, and stop the server (SIGTERM, then SIGKILL)
before the next mode. Timing is client-side wall time per request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from bench.report import ModeResult, RequestResult

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


class BenchError(RuntimeError):
    """The benchmark could not run (server died, did not come up, bad prompts file...)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str  # "chat" | "completion"
    prompt: str


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    prompts = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = Prompt(id=str(row["id"]), kind=row.get("kind", "chat"), prompt=row["prompt"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"{path}:{lineno}: bad prompt line ({exc})") from exc
        if prompt.kind not in ("chat", "completion"):
            raise BenchError(f"{path}:{lineno}: kind must be chat or completion, got {prompt.kind!r}")
        prompts.append(prompt)
    if not prompts:
        raise BenchError(f"{path}: no prompts")
    return prompts[:limit] if limit else prompts


@dataclass(frozen=True)
class Run:
    """One column of the report: a mode, optionally with config settings (`tandem serve --set`)."""

    label: str
    mode: str
    settings: tuple[str, ...] = ()

    @staticmethod
    def parse_variant(text: str, modes: tuple[str, ...]) -> "Run":
        """'LABEL=MODE KEY=VALUE ...', e.g. 'amusd-ra16=amusd speculation.max_run_ahead=16'."""
        label, sep, rest = text.partition("=")
        words = rest.split(" ", 1)
        mode, settings = words[0].strip(), (words[1] if len(words) > 1 else "")
        if not sep or not label.strip() or mode not in modes:
            raise BenchError(f"a variant must look like 'LABEL=MODE key=value ...' with MODE one of {', '.join(modes)}; got {text!r}")
        from configs.loader import ConfigError, parse_setting

        items = tuple(s for s in settings.split(" ") if s)
        try:
            for item in items:
                parse_setting(item)
        except ConfigError as exc:
            raise BenchError(f"variant {label!r}: {exc}") from None
        return Run(label.strip(), mode, items)


@dataclass(frozen=True)
class Settings:
    config: str | None
    dtype: str | None
    port: int
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    num_draft_tokens: int | None
    logprobs: bool  # ask for top-2 logprobs (token sequences + divergence margins)
    startup_timeout_s: float
    request_timeout_s: float


# ---------------------------------------------------------------- the server process


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


class ServerProcess:
    """``tandem serve`` for one mode, as a context manager."""

    def __init__(self, run: Run, settings: Settings, log_path: Path, say: Callable[[str], None] = print):
        self.run = run
        self.mode = run.label
        self.settings = settings
        self.log_path = log_path
        self.say = say
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "server.cli", "serve", "--mode", self.run.mode, "--port", str(s.port)]
        cmd += ["--host", "127.0.0.1"]
        if s.config:
            cmd += ["--config", s.config]
        if s.dtype:
            cmd += ["--dtype", s.dtype]
        if s.num_draft_tokens is not None:
            cmd += ["--num-draft-tokens", str(s.num_draft_tokens)]
        # every request computes its whole prompt, as the llama.cpp peers do (a variant may turn it on)
        cmd += ["--set", "scheduler.prefix_caching=false"]
        for setting in self.run.settings:
            cmd += ["--set", setting]
        return cmd

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        port = self.settings.port
        if _port_in_use(port):
            raise BenchError(f"port {port} is already in use; pick another with --port")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.say(f"[{self.mode}] starting: {' '.join(self.command)}  (log: {self.log_path})")
        log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        # own session: on a hung shutdown we can kill the server and the workers it started, and only those
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_healthy(t0)
        self.startup_s = time.perf_counter() - t0
        self.say(f"[{self.mode}] healthy after {self.startup_s:.1f}s")

    def _wait_healthy(self, t0: float) -> None:
        url = f"http://127.0.0.1:{self.settings.port}/health"
        next_note = 10.0
        last = "no answer yet"
        while True:
            code = self.process.poll()
            if code is not None:
                raise BenchError(
                    f"[{self.mode}] server exited with code {code} before it was healthy; last log lines:\n"
                    + _tail(self.log_path)
                )
            try:
                response = httpx.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            elapsed = time.perf_counter() - t0
            if elapsed > self.settings.startup_timeout_s:
                self.stop()
                raise BenchError(
                    f"[{self.mode}] server not healthy after {elapsed:.0f}s ({last}); last log lines:\n"
                    + _tail(self.log_path)
                )
            if elapsed >= next_note:
                self.say(f"[{self.mode}] waiting for /health ... {elapsed:.0f}s ({last})")
                next_note += 10.0
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is None:
            return
        pgid = self.process.pid  # session leader: its pid is the group id
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.say(f"[{self.mode}] server ignored SIGTERM for {grace_s:.0f}s; killing its process group")
                os.killpg(pgid, signal.SIGKILL)
                self.process.wait()
        # workers it started that outlived it: give them a moment, then kill the group
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            self.say(f"[{self.mode}] leftover worker processes; killing process group {pgid}")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None


# ---------------------------------------------------------------- requests


def _as_dict(obj: Any) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return obj
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _content_logprobs(content: list[dict]) -> tuple[list[str], list[list[float]]]:
    """OpenAI chat-style logprobs ({"content": [{token, logprob, top_logprobs}]}) -> tokens, top logprobs."""
    tokens = [c["token"] for c in content]
    top = [[t["logprob"] for t in (c.get("top_logprobs") or [])] for c in content]
    return tokens, top


def parse_response(prompt: Prompt, response: Any, wall_s: float) -> RequestResult:
    """An OpenAI SDK response (chat or completion) -> RequestResult (pure: tested without a server).

    Tandem's extra "speculation" field gives the draft counts; llama-server's "timings"
    (draft_n, draft_n_accepted) give them for llama.cpp. Logprobs may be absent; a
    completion's may come as OpenAI's legacy lists or, from llama-server, in the chat form.
    """
    data = _as_dict(response)
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    spec = data.get("speculation") or {}
    timings = data.get("timings") or {}
    if not spec and "draft_n" in timings:
        spec = {"num_draft_tokens": timings["draft_n"], "num_accepted_tokens": timings.get("draft_n_accepted")}
    tokens = top = None
    logprobs = choice.get("logprobs") or {}
    if prompt.kind == "chat":
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    if logprobs.get("content") is not None:
        tokens, top = _content_logprobs(logprobs["content"])
    elif logprobs.get("tokens") is not None:
        tokens = list(logprobs["tokens"])
        top = [sorted((d or {}).values(), reverse=True) for d in (logprobs.get("top_logprobs") or [])]
        if len(top) != len(tokens):
            top = None
    completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None:
        completion_tokens = len(tokens) if tokens is not None else 0
    return RequestResult(
        prompt_id=prompt.id,
        kind=prompt.kind,
        prompt=prompt.prompt,
        text=text,
        completion_tokens=int(completion_tokens),
        wall_s=wall_s,
        finish_reason=choice.get("finish_reason"),
        tokens=tokens,
        top_logprobs=top,
        num_draft_tokens=spec.get("num_draft_tokens"),
        num_accepted_tokens=spec.get("num_accepted_tokens"),
        num_target_passes=spec.get("num_target_passes"),
    )


class Client:
    """Sends one prompt, non-streaming, and times it (to Tandem on settings.port, or to base_url)."""

    def __init__(self, settings: Settings, base_url: str | None = None):
        import openai  # the test extra; imported here so `bench.report` needs nothing

        self.settings = settings
        self.openai = openai.OpenAI(
            base_url=base_url or f"http://127.0.0.1:{settings.port}/v1",
            api_key="none",
            timeout=settings.request_timeout_s,
            max_retries=0,
        )
        self.model = self.openai.models.list().data[0].id

    def send(self, prompt: Prompt, max_tokens: int | None = None, extra: dict[str, Any] | None = None) -> RequestResult:
        """extra: more request parameters (e.g. response_format)."""
        s = self.settings
        common: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens or s.max_tokens,
            "temperature": s.temperature,
            "stream": False,
            **(extra or {}),
        }
        if s.top_p is not None:
            common["top_p"] = s.top_p
        if s.seed is not None:
            common["seed"] = s.seed
        t0 = time.perf_counter()
        if prompt.kind == "chat":
            extra = {"logprobs": True, "top_logprobs": 2} if s.logprobs else {}
            response = self.openai.chat.completions.create(
                messages=[{"role": "user", "content": prompt.prompt}], **common, **extra
            )
        else:
            extra = {"logprobs": 2} if s.logprobs else {}
            response = self.openai.completions.create(prompt=prompt.prompt, **common, **extra)
        wall = time.perf_counter() - t0
        return parse_response(prompt, response, wall)


# server counters whose change over the measured requests goes into the report
WORKER_COUNTERS = {
    "verify_busy_s": ("tandem:worker_busy_seconds_total", (("role", "verify"),)),
    "draft_busy_s": ("tandem:worker_busy_seconds_total", (("role", "draft"),)),
    "rollbacks": ("tandem:spec_decode_rollbacks_total", ()),
    "stale_draft_tokens": ("tandem:spec_decode_stale_draft_tokens_total", ()),
    "verify_wait_s": ("tandem:verify_draft_wait_seconds_total", ()),
}
STATS_INTERVAL_S = 0.5  # how often workers report their counters


def scrape_counters(port: int) -> dict[str, float]:
    """The WORKER_COUNTERS now (0 for series the server does not export); one
    server serves one model, so its model_name label is left out of the match."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return {key: samples.get(series, 0.0) for key, series in WORKER_COUNTERS.items()}


def warm_up(label: str, client: Client, prompts: list[Prompt], settings: Settings, say: Callable[[str], None] = print) -> None:
    """One uncounted request (the first prompt, up to 32 tokens): first-call costs stay out of the figures."""
    t0 = time.perf_counter()
    client.send(prompts[0], max_tokens=min(settings.max_tokens, 32))
    say(f"[{label}] warm-up done in {time.perf_counter() - t0:.2f}s (not counted)")


def measure(
    label: str,
    client: Client,
    prompts: list[Prompt],
    server_alive: Callable[[], bool],
    log_path: Path | None,
    say: Callable[[str], None] = print,
) -> list[RequestResult]:
    """Every prompt in order, sequentially, each timed by the client."""
    results = []
    for i, prompt in enumerate(prompts, 1):
        try:
            r = client.send(prompt)
        except Exception as exc:
            if not server_alive():
                tail = _tail(log_path) if log_path else ""
                raise BenchError(f"[{label}] server died during {prompt.id}; last log lines:\n" + tail) from exc
            raise BenchError(f"[{label}] request {prompt.id} failed: {exc}") from exc
        results.append(r)
        tps = r.completion_tokens / r.wall_s if r.wall_s > 0 else float("nan")
        say(
            f"[{label}] {i:2d}/{len(prompts)} {prompt.id:<22} {r.completion_tokens:4d} tok "
            f"{r.wall_s:6.2f}s {tps:7.2f} tok/s  passes={r.num_target_passes} acc={r.num_accepted_tokens}/{r.num_draft_tokens}"
        )
    return results


def run_mode(
    run: Run, prompts: list[Prompt], settings: Settings, log_dir: Path, say: Callable[[str], None] = print
) -> ModeResult:
    """Start the server for `run` (a mode, maybe with settings), run a warm-up then every prompt, stop it."""
    mode = run.label
    server = ServerProcess(run, settings, log_path(log_dir, "server", mode), say)
    with server:
        client = Client(settings)
        warm_up(mode, client, prompts, settings, say)
        time.sleep(STATS_INTERVAL_S + 0.1)  # let the workers report the warm-up
        before = scrape_counters(settings.port)
        results = measure(mode, client, prompts, server.alive, server.log_path, say)
        time.sleep(STATS_INTERVAL_S + 0.1)
        after = scrape_counters(settings.port)
    counters = {key: after[key] - before[key] for key in WORKER_COUNTERS}
    return ModeResult(mode=mode, requests=results, startup_s=server.startup_s, counters=counters)


def log_path(log_dir: Path, kind: str, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return log_dir / f"{kind}-{safe}-{time.strftime('%Y%m%d-%H%M%S')}.log"
