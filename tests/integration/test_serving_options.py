"""A real `tandem serve` (tiny model, sd): /health while the models load, model
aliases from the command line, the access log from the config, and the
X-Request-Id of a request in the server's log lines."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.helpers import REPO, RunningServer, free_port, stop_server, tiny_pair, wait_until, write_config


@pytest.fixture(scope="module")
def started(tmp_path_factory, tiny_target_dir):
    """The server, every /health answer from its first second until it was ready, and its log file."""
    root = tmp_path_factory.mktemp("options")
    config = write_config(
        root / "options.yaml",
        **tiny_pair(tiny_target_dir),
        server={"access_log": True},
    )
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port),
             "--served-model-name", "tiny-a", "tiny-b"],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
        )
    server = RunningServer(process, port)
    answers: list[tuple[int, dict]] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(httpx.TransportError):  # refused until uvicorn listens
                r = httpx.get(f"{server.url}/health", timeout=5)
                answers.append((r.status_code, r.json()))
                if r.status_code == 200:
                    break
            time.sleep(0.02)
        assert answers and answers[-1][0] == 200, (answers[-3:], log_path.read_text()[-2000:])
        yield server, answers, log_path
    finally:
        stop_server(server)


def test_health_answers_503_while_loading(started):
    """Catches: the HTTP server starting only after the workers (connections refused
    while loading), or a loading answer that is not a clear JSON error."""
    _, answers, _ = started
    loading = [body for status, body in answers if status == 503]
    assert loading, f"never saw a 503 before ready: {answers[:3]}"
    assert all(status in (503, 200) for status, _ in answers)
    first_ok = next(i for i, (status, _) in enumerate(answers) if status == 200)
    assert all(status == 503 for status, _ in answers[:first_ok])  # never back to 503 once ready
    error = loading[0]["error"]
    assert error["type"] == "service_unavailable_error" and "starting" in error["message"]
    assert answers[first_ok][1] == {"status": "ok"}


def test_aliases_from_the_command_line(started):
    """Catches: --served-model-name not reaching the app, or the config's model_name still accepted."""
    server, _, _ = started
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in sdk.models.list()] == ["tiny-a"]
    assert sdk.completions.create(model="tiny-b", prompt="Hello", max_tokens=3, temperature=0).model == "tiny-a"
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="tiny", prompt="Hello", max_tokens=3)


def test_request_id_in_the_log(started):
    """Catches: the X-Request-Id missing from the server's log lines for that request
    (here uvicorn's access line, switched on by the config's server.access_log)."""
    server, _, log_path = started
    r = httpx.post(f"{server.base_url}/completions", headers={"X-Request-Id": "trace-me-4711"},
                   json={"model": "tiny-a", "prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-me-4711"

    def logged() -> list[str]:
        return [line for line in log_path.read_text().splitlines() if "trace-me-4711" in line]

    assert wait_until(lambda: logged(), timeout_s=10), log_path.read_text()[-2000:]
    line = logged()[0]
    assert "[trace-me-4711]" in line and "POST /v1/completions" in line and " 200" in line
