"""Test helpers: write configs, launch a real server, read its metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"device": "cpu", "threads": 1}
# easyspec on a 2-layer tiny draft: both layers in one parallel group over 2 ranks
TINY_EASYSPEC_SECTIONS = {
    "placement": {"default": {"target": ONE_THREAD, "draft": ONE_THREAD, "draft_ranks": [ONE_THREAD]}},
    "easyspec": {"sequential_head": 0, "sequential_tail": 0},
}


def tiny_pair(model_dir) -> dict:
    """The target and draft sections of the tests' pair: a model in float32, its int8 draft."""
    return {
        "target": {"path": str(model_dir), "dtype": "float32"},
        "draft": {"path": str(model_dir), "dtype": "float32", "quantization": "int8"},
    }


def write_config(path: Path, **sections) -> Path:
    """A config for tests: one thread per worker, small context, given sections on top."""
    config = {
        "model_name": "tiny",
        # fixed k: each round's drafts do not depend on this machine's timing (tests of adaptive
        # speculation turn it on)
        "speculation": {"mode": "sd", "num_draft_tokens": 4, "draft_timeout_s": 10, "adaptive": False},
        "placement": {"default": {"target": ONE_THREAD, "draft": ONE_THREAD}},
        "scheduler": {"max_model_len": 512, "max_running_requests": 4, "max_waiting_requests": 32},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(predicate, timeout_s: float = 60.0, interval_s: float = 0.1) -> bool:
    """Poll predicate until it holds (True) or timeout_s passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the name in (...) may hold spaces
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample as {(name, sorted labels): value}."""
        return metric_samples(self.url)

    def metric(self, name: str, **labels) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a server's /metrics as {(name, sorted labels but model_name): value}
    (one server serves one model)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def wait_healthy(server: RunningServer, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with code {server.process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError("server did not become healthy")


@contextlib.contextmanager
def launch_server(config: Path, *extra_args: str, mode: str | None = None):
    """Run `tandem serve` as a real subprocess; stop it (SIGTERM) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", str(port)]
    if mode:
        command += ["--mode", mode]
    process = subprocess.Popen([*command, *extra_args], cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = RunningServer(process, port)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def greedy_chat_answers(
    config: Path, mode: str, model: str, questions: list[str], max_tokens: int, timeout_s: float = 120
) -> tuple[list[str], list[dict]]:
    """Serve `config` in float32 in `mode` at fixed k (every round drafts: the stats show the
    drafts were accepted, whatever this machine's timing); the greedy answer to each question
    and its speculation stats, through the OpenAI SDK."""
    import openai

    texts, stats = [], []
    with launch_server(config, "--dtype", "float32", "--set", "speculation.adaptive=false", mode=mode) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=timeout_s)
        for question in questions:
            reply = sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
            )
            texts.append(reply.choices[0].message.content)
            stats.append(reply.model_extra["speculation"])
    return texts, stats


def stop_server(server: RunningServer, timeout_s: float = 20) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


class UvicornThread:
    """A real uvicorn server in a daemon thread, on a socket bound before it starts."""

    def __init__(self, app):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> "UvicornThread":
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()


# Texts that exercise a byte-level BPE tokenizer: whitespace runs, code, non-ASCII, emoji,
# special tokens written as text, digits.
TOKENIZER_PROBES = (
    "Hello world",
    "  leading spaces\tand tabs\n\nnewlines",
    "def f(x):\n    return x**2  # ünïcødé 日本語 🤖",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>text",
    "’curly’ quotes — dash",
    "1234567890 3.14159",
    "a" * 50,
)


def assert_same_tokenizer_behaviour(ours, reference) -> None:
    """`ours` encodes, decodes and renders chats exactly as `reference` does."""
    assert len(ours) == len(reference) and ours.get_vocab() == reference.get_vocab()
    assert (ours.eos_token_id, ours.bos_token_id) == (reference.eos_token_id, reference.bos_token_id)
    assert {k: str(v) for k, v in ours.added_tokens_decoder.items()} == {
        k: str(v) for k, v in reference.added_tokens_decoder.items()
    }
    for text in TOKENIZER_PROBES:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == reference.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
