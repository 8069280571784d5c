"""Fixtures for the API tests.

Backend-agnostic tests use only `server_url`, `model_name`, `client` and `http`
and run twice: against the app from `create_app` in a real uvicorn on top of
the in-test FakeBackend, and against a real launched `tandem serve` (verify and
draft worker processes, tiny random model). Tests that steer the fake
(`app_engine`) live in test_fake_engine_controls.py and use the fake only.
"""

from __future__ import annotations


import httpx
import openai
import pytest

from server.app import create_app
from server.serving import AppSettings
from tests.api.fake_backend import FakeBackend
from tests.helpers import UvicornThread

TEST_MODEL_NAME = "tandem-test-model"
TEST_MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def app_settings(smollm_tokenizer) -> AppSettings:
    return AppSettings(
        model_name=TEST_MODEL_NAME,
        max_model_len=TEST_MAX_MODEL_LEN,
        eos_token_ids=(smollm_tokenizer.eos_token_id,),
    )


@pytest.fixture(scope="session")
def app_engine(smollm_tokenizer) -> FakeBackend:
    return FakeBackend(smollm_tokenizer)


@pytest.fixture(scope="session")
def fake_server_url(app_engine, smollm_tokenizer, app_settings):
    with UvicornThread(create_app(app_engine, smollm_tokenizer, app_settings)) as server:
        yield server.url


@pytest.fixture(scope="session")
def launched_server_url(tiny_config):
    from tests.helpers import launch_server

    with launch_server(tiny_config, mode="sd") as server:
        yield server.url


@pytest.fixture(scope="session", params=["fake-backend", "real-workers"])
def server_url(request):
    name = "fake_server_url" if request.param == "fake-backend" else "launched_server_url"
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
