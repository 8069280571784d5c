"""Serving options of the HTTP app: model aliases, CORS, the API key on the
tokenizer routes (the app from create_app in a real uvicorn, on the fake backend)."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest

from server.app import create_app
from tests.api.fake_backend import FakeBackend
from tests.api.helpers import assert_error
from tests.helpers import UvicornThread

ORIGIN = "http://dashboard.example"
KEY = "sk-options"


@pytest.fixture(scope="module")
def options_url(smollm_tokenizer, app_settings):
    settings = dataclasses.replace(app_settings, model_name="primary", model_aliases=("alias-1", "alias-2"),
                                   allowed_origins=(ORIGIN,), api_key=KEY)
    with UvicornThread(create_app(FakeBackend(smollm_tokenizer), smollm_tokenizer, settings)) as server:
        yield server.url


def test_every_alias_serves_and_the_first_name_is_shown(options_url):
    """Catches: aliases refused (404), responses naming the alias instead of the served
    name, /v1/models listing the aliases as more models, a 404 that hides the names."""
    sdk = openai.OpenAI(base_url=f"{options_url}/v1", api_key=KEY, max_retries=0, timeout=30)
    for name in ("primary", "alias-1", "alias-2"):
        r = sdk.completions.create(model=name, prompt="hi", max_tokens=2)
        assert r.model == "primary"
    assert [m.id for m in sdk.models.list()] == ["primary"]
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="alias-3", prompt="hi", max_tokens=2)
    message = caught.value.body["message"]
    assert all(f"'{name}'" in message for name in ("primary", "alias-1", "alias-2"))


def test_cors_preflight_and_headers(options_url):
    """Catches: CORS inside the API-key check (a browser's preflight carries no key and
    would get 401), CORS headers for origins not allowed, X-Request-Id not exposed."""
    preflight = httpx.options(f"{options_url}/v1/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    r = httpx.get(f"{options_url}/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    other = httpx.get(f"{options_url}/health", headers={"Origin": "http://elsewhere.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
    bad_preflight = httpx.options(f"{options_url}/v1/completions", headers={
        "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert bad_preflight.status_code == 400


def test_no_cors_unless_configured(fake_server_url):
    """Catches: CORS switched on by default (any web page could call the server from a browser)."""
    r = httpx.get(f"{fake_server_url}/health", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_tokenizer_routes_need_the_key(options_url):
    """Catches: /tokenize and /detokenize left open on a server that has an API key."""
    assert_error(httpx.post(f"{options_url}/tokenize", json={"prompt": "hi"}), 401)
    assert_error(httpx.post(f"{options_url}/detokenize", json={"tokens": [1]}), 401)
    ok = httpx.post(f"{options_url}/tokenize", json={"model": "alias-2", "prompt": "hi"},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["count"] == 1
    assert httpx.get(f"{options_url}/version").status_code == 200  # stays open, like /health
