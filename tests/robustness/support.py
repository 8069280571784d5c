"""Helpers for the robustness tests: the error envelope, health, process memory,
and an in-test backend with WorkerBackend's bound on pending requests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from server.backend import BackendOverloaded
from tests.api.fake_backend import FakeBackend
from tests.helpers import RunningServer, tiny_pair, write_config

MODEL = "tiny"  # the model name write_config gives


def assert_envelope(response: httpx.Response, status: int | None = None) -> dict:
    """OpenAI's error envelope (and `status`, when given); returns the error object."""
    if status is not None:
        assert response.status_code == status, response.text[:500]
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return error


def health_latency(url: str) -> float:
    """Seconds /health took; asserts it answered 200."""
    start = time.perf_counter()
    response = httpx.get(f"{url}/health", timeout=10)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


def greedy(url: str, prompt: str = "The sea is", max_tokens: int = 8, headers: dict | None = None) -> str:
    response = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def assert_serving(url: str, expected: str | None = None, headers: dict | None = None) -> None:
    """/health is 200 and a greedy completion works (and equals `expected`, when given)."""
    health_latency(url)
    text = greedy(url, headers=headers)
    if expected is not None:
        assert text == expected


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def process_rss(server: RunningServer) -> dict[str, int]:
    """{'server': KiB, 'verify': KiB, 'draft': KiB} of a launched server's processes."""
    out = {"server": rss_kib(server.process.pid)}
    for pid in server.worker_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        role = next((r for r in ("verify", "draft") if f"workers.{r}" in cmdline), f"pid{pid}")
        out[role] = rss_kib(pid)
    return out


def tiny_server_config(path: Path, tiny_target_dir: Path, **sections) -> Path:
    """write_config for the tiny model, float32, int8 draft (like the tiny_config fixture)."""
    return write_config(
        path,
        **tiny_pair(tiny_target_dir),
        **sections,
    )


class BoundedFakeBackend(FakeBackend):
    """The FakeBackend with WorkerBackend's bound on queued + running requests."""

    def __init__(self, tokenizer, max_pending: int, step_delay_s: float = 0.0):
        super().__init__(tokenizer, step_delay_s)
        self.max_pending = max_pending
        self.pending: set[str] = set()

    @property
    def num_pending(self) -> int:
        return len(self.pending)

    async def generate(self, request):
        if len(self.pending) >= self.max_pending:
            raise BackendOverloaded(f"server busy: {len(self.pending)} requests in flight")
        self.pending.add(request.request_id)
        try:
            async for output in super().generate(request):
                yield output
        finally:
            self.pending.discard(request.request_id)
