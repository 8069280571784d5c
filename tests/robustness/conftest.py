"""Fixtures for the robustness tests.

`robust_server` is one real launched server (tiny model, `sd`: verify and draft
worker processes) shared by the tests that only need a healthy server; its
ZeroMQ addresses are explicit so that tests can reach the workers' inboxes.
Tests that need other limits launch their own. `serve_app` runs the HTTP app
from create_app on an in-test backend, for what is cheaper to test without
workers (and for fuzzing at volume).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest

from server.app import create_app
from server.serving import AppSettings
from tests.helpers import UvicornThread, launch_server
from tests.robustness.support import MODEL, tiny_server_config


@pytest.fixture(scope="session")
def zmq_addresses(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("zmq")
    return {role: f"ipc://{root}/{role}.sock" for role in ("server", "verify", "draft")}


@pytest.fixture(scope="session")
def robust_server(tmp_path_factory, tiny_target_dir, zmq_addresses):
    config = tiny_server_config(tmp_path_factory.mktemp("robust") / "tiny.yaml", tiny_target_dir,
                                addresses=zmq_addresses)
    with launch_server(config, mode="sd") as server:
        yield server


@pytest.fixture(scope="session")
def base_settings(smollm_tokenizer) -> AppSettings:
    return AppSettings(model_name=MODEL, max_model_len=512, eos_token_ids=(smollm_tokenizer.eos_token_id,))


@pytest.fixture
def serve_app(smollm_tokenizer, base_settings):
    """serve_app(backend, **settings) -> a context manager yielding the base URL."""

    @contextlib.contextmanager
    def serve(backend, **settings):
        app = create_app(backend, smollm_tokenizer, replace(base_settings, **settings))
        with UvicornThread(app) as server:
            yield server.url

    return serve
