"""POST /tokenize, POST /detokenize (vLLM's shapes), GET /version and X-Request-Id
(backend-agnostic: the fake backend and real workers)."""

from __future__ import annotations

from importlib import metadata

from tests.api.helpers import assert_error

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]


def test_tokenize_prompt_is_what_a_completion_sees(http, client, model_name, max_model_len, smollm_tokenizer):
    """Catches: /tokenize encoding differently from /v1/completions (special tokens,
    another tokenizer), a wrong count or max_model_len, token_strs out of order."""
    text = "Hello world, ünïcödé 🤗"
    r = http.post("/tokenize", json={"model": model_name, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["tokens"] == smollm_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == max_model_len
    assert body["token_strs"] == smollm_tokenizer.convert_ids_to_tokens(body["tokens"])
    used = client.completions.create(model=model_name, prompt=text, max_tokens=1).usage.prompt_tokens
    assert used == body["count"]
    plain = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()  # model optional
    assert plain["tokens"] == smollm_tokenizer.encode(text, add_special_tokens=False) and plain["token_strs"] is None


def test_tokenize_messages_is_what_a_chat_sees(http, client, model_name):
    """Catches: chat tokenization not going through the chat template the chat endpoint uses."""
    r = http.post("/tokenize", json={"model": model_name, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    used = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    assert r.json()["count"] == used


def test_detokenize_round_trip(http, model_name):
    """Catches: detokenize dropping special tokens or spaces, or accepting ids outside the vocabulary."""
    text = "<|im_start|>user\n  two  spaces, 你好<|im_end|>"
    ids = http.post("/tokenize", json={"model": model_name, "prompt": text}).json()["tokens"]
    r = http.post("/detokenize", json={"model": model_name, "tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": text}
    assert_error(http.post("/detokenize", json={"tokens": [1, 10**9]}), 400, "tokens")


def test_tokenize_errors(http, model_name):
    """Catches: unknown models or malformed bodies answered 200 or 500 instead of OpenAI's envelope."""
    assert_error(http.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "model")
    assert_error(http.post("/tokenize", json={"prompt": 3}), 400, "prompt")
    assert_error(http.post("/tokenize", json={"prompt": "x", "bogus": 1}), 400, "bogus")
    assert_error(http.post("/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}), 400,
                 "add_generation_prompt")
    lone_surrogate = b'{"prompt": "a\\ud800b"}'  # JSON allows the escape; the tokenizer must not see it
    assert_error(http.post("/tokenize", content=lone_surrogate, headers={"Content-Type": "application/json"}), 400)
    assert_error(http.post("/detokenize", json={"tokens": "12"}), 400, "tokens")


def test_version(http):
    """Catches: /version missing or not the installed package's version."""
    r = http.get("/version")
    assert r.status_code == 200 and r.json() == {"version": metadata.version("tandem")}


def test_request_id_is_echoed_or_made(http, model_name):
    """Catches: X-Request-Id not echoed, the same id reused across requests, or a
    header that could break a log line passed through."""
    given = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 1},
                      headers={"X-Request-Id": "client-id-7"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "client-id-7"
    made = [http.get("/health").headers["x-request-id"] for _ in range(2)]
    assert made[0] != made[1] and all(len(m) == 32 and int(m, 16) >= 0 for m in made)
    odd = http.get("/health", headers={"X-Request-Id": "has spaces " + "x" * 200})
    assert odd.headers["x-request-id"] != "has spaces " + "x" * 200 and len(odd.headers["x-request-id"]) == 32
    # errors carry it too (the body-size and key checks answer before the routes)
    error = http.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-Id": "e-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "e-1"
