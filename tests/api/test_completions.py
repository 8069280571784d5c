"""POST /v1/completions through the real OpenAI SDK. Backend-agnostic: shapes,
streamed == non-streamed text (greedy), usage arithmetic, stop strings."""

from __future__ import annotations

import pytest

PROMPT = "Write a short story about a fox:"
TOKEN_PROMPTS = [[100, 101, 102, 103], [200, 201]]


def test_shape_and_usage(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == model_name
    assert isinstance(r.created, int)
    (choice,) = r.choices
    assert choice.index == 0 and isinstance(choice.text, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == 12
    spec = r.model_extra["speculation"]
    assert set(spec) == {"num_draft_tokens", "num_accepted_tokens", "num_target_passes"}
    assert 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert 1 <= spec["num_target_passes"] <= u.completion_tokens


def test_default_max_tokens_is_16(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, temperature=0)
    assert r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_token_id_prompt_counts_exactly(client, model_name):
    r = client.completions.create(model=model_name, prompt=TOKEN_PROMPTS[0], max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(TOKEN_PROMPTS[0])


def test_stream_equals_non_stream(client, model_name):
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == model_name for c in chunks)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason] == [full.choices[0].finish_reason]
    assert body[-1].choices[0].finish_reason is not None  # the finish reason comes last
    assert last.choices == [] and last.usage == full.usage
    assert all(c.usage is None for c in body)


def test_stream_without_usage_has_no_usage_chunk(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=6, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_and_prompt_lists(client, model_name):
    r = client.completions.create(model=model_name, prompt=TOKEN_PROMPTS, n=2, max_tokens=5, temperature=0.8,
                                  seed=7, logprobs=0)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == sum(len(p) for p in TOKEN_PROMPTS)  # once per prompt, not per choice
    counts = [len(c.logprobs.tokens) for c in r.choices]
    assert r.usage.completion_tokens == sum(counts)
    for c, count in zip(r.choices, counts):
        assert 1 <= count <= 5 and (c.finish_reason != "length" or count == 5)


def test_n_streamed(client, model_name):
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, n=3, max_tokens=8, stream=True,
                                            temperature=1.0, stream_options={"include_usage": True}))
    texts, finishes = {}, {}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            assert choice.index not in finishes
            finishes[choice.index] = choice.finish_reason
    assert sorted(finishes) == [0, 1, 2] and sorted(texts) == [0, 1, 2]
    assert 3 <= chunks[-1].usage.completion_tokens <= 24


def test_echo(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, echo=True, temperature=0)
    plain = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, echo=True,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == chosen
        assert all(v <= 0 for v in top.values())
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Streamed logprobs carry the same tokens.
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2, stream=True)]
    assert [t for s in streamed if s for t in s.tokens] == lp.tokens
    assert [o for s in streamed if s for o in s.text_offset] == lp.text_offset


def token_raw(token: str) -> bytes:
    """A logprobs token's bytes ("bytes:\\xf0\\x9f" for part of a character)."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token[len("bytes:"):].replace("\\x", ""))
    return token.encode()


def token_boundary_stops(tokens: list[str], text: str) -> list[str]:
    """Three-character strings of `text` that straddle a token boundary."""
    stops, raw = [], b""
    for token in tokens[:-1]:
        raw += token_raw(token)
        try:
            prefix = raw.decode()
        except UnicodeDecodeError:
            continue  # inside a character
        if not text.startswith(prefix):
            break
        offset = len(prefix)
        candidate = text[offset - 1: offset + 2]
        if offset >= 2 and len(candidate) == 3 and "\ufffd" not in candidate and candidate.strip():
            stops.append(candidate)
    return stops


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens(client, model_name, stream):
    base = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=32, temperature=0, logprobs=0)
    text = base.choices[0].text
    stops = token_boundary_stops(base.choices[0].logprobs.tokens, text)
    if not stops:
        pytest.skip("the output has no clean token boundary to stop at")
    stop = stops[len(stops) // 2]
    kwargs = dict(model=model_name, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop, "\x00never"])
    if stream:
        chunks = list(client.completions.create(**kwargs, stream=True))
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.completions.create(**kwargs)
        got, finish = r.choices[0].text, r.choices[0].finish_reason
        assert r.usage.completion_tokens < base.usage.completion_tokens or stop in text[-3:]
    assert got == text[: text.index(stop)]
    assert finish == "stop"


def test_concurrent_requests_are_independent(client, model_name):
    import concurrent.futures

    def one(prompt):
        return client.completions.create(model=model_name, prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    prompts = [f"{PROMPT} number {i}" for i in range(6)]
    alone = [one(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone
