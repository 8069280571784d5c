"""POST /v1/chat/completions through the real OpenAI SDK (backend-agnostic)."""

from __future__ import annotations

import pytest

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


def test_shape_and_usage(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == model_name
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert choice.finish_reason != "length" or u.completion_tokens == 12
    assert r.model_extra["speculation"]["num_target_passes"] >= 1


def test_max_completion_tokens(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


def test_stream_equals_non_stream(client, model_name):
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-")
    first = body[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == "" and first.finish_reason is None
    assert all(c.choices[0].delta.role is None for c in body[1:])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert [c for c in body if c.choices[0].finish_reason] == [body[-1]]
    assert last.choices == [] and last.usage == full.usage
    assert all(c.usage is None for c in body)


def test_n_choices(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, n=3, max_tokens=6, temperature=0.9,
                                       seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in r.choices)
    assert r.usage.completion_tokens <= 18
    chunks = list(client.chat.completions.create(model=model_name, messages=MESSAGES, n=2, max_tokens=6,
                                                 stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]


def test_logprobs(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) <= 2
        assert all(t.logprob <= 0 and isinstance(t.token, str) for t in entry.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(e.top_logprobs and e.logprob >= max(t.logprob for t in e.top_logprobs) - 1e-4 for e in content)
    # The bytes of all tokens spell the text (special tokens like EOS aside).
    text = r.choices[0].message.content
    spelled = bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace")
    assert spelled.startswith(text)

    streamed = [e for c in client.chat.completions.create(
        model=model_name, messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
        stream=True) if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_logprobs_without_top(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string(client, model_name, stream):
    base = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=24, temperature=0)
    text = base.choices[0].message.content
    stop = next((text[i:i + 2] for i in range(len(text) // 2, len(text) - 2)
                 if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2]), None)
    if stop is None:
        pytest.skip("output too short to pick a stop string")
    kwargs = dict(model=model_name, messages=MESSAGES, max_tokens=24, temperature=0, stop=stop)
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        got, finish = choice.message.content, choice.finish_reason
    assert (got, finish) == (text[: text.index(stop)], "stop")


def test_content_parts_and_developer_role(client, model_name):
    r = client.chat.completions.create(model=model_name, max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]},
    ])
    assert r.choices[0].message.role == "assistant"
