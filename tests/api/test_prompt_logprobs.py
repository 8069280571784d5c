"""echo + logprobs (prompt logprobs), max_tokens 0, up to 20 alternatives
(backend-agnostic: the fake backend and real workers, through the OpenAI SDK)."""

from __future__ import annotations

import math

import pytest

from tests.api.helpers import assert_error

PROMPT_IDS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767]  # "The quick brown fox jumps over the lazy dog"


def check_legacy_logprobs(lp, num_top: int) -> None:
    """The shape lm-evaluation-harness reads: one entry per token; a None pair only first."""
    n = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for i, (token, chosen, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        if chosen is None:
            assert i == 0 and top is None
            continue
        assert chosen <= 0 and math.isfinite(chosen)
        assert top[token] == chosen  # the chosen token is always among the alternatives
        assert num_top <= len(top) <= num_top + 1
        assert all(v <= 0 for v in top.values())


def test_echo_with_logprobs_scores_every_prompt_token(client, model_name, smollm_tokenizer):
    """Catches: echo+logprobs refused or returning only the generated tokens; prompt
    logprobs shifted by one (the first prompt token must be the one without a score)."""
    r = client.completions.create(model=model_name, prompt=PROMPT_IDS, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)
    choice = r.choices[0]
    lp = choice.logprobs
    n_gen = r.usage.completion_tokens
    assert len(lp.tokens) == len(PROMPT_IDS) + n_gen
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None for x in lp.token_logprobs[1:])
    from server.tokenization import token_text

    assert lp.tokens[: len(PROMPT_IDS)] == [token_text(smollm_tokenizer, t) for t in PROMPT_IDS]
    check_legacy_logprobs(lp, 2)
    # the generated part is what the same request without echo reports
    plain = client.completions.create(model=model_name, prompt=PROMPT_IDS, max_tokens=3, temperature=0, logprobs=2)
    assert lp.tokens[len(PROMPT_IDS):] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[len(PROMPT_IDS):] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert choice.text == smollm_tokenizer.decode(PROMPT_IDS) + plain.choices[0].text


def test_max_tokens_zero_scores_the_prompt_only(client, model_name):
    """lm-eval's older loglikelihood requests: max_tokens 0 with echo. Catches: a 400 for
    max_tokens 0, a generated token sneaking in, usage counting one."""
    r = client.completions.create(model=model_name, prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(PROMPT_IDS) and r.usage.completion_tokens == 0
    assert r.choices[0].finish_reason == "length"
    check_legacy_logprobs(lp, 1)
    # the same prompt logprobs as with a generated token after them
    one = client.completions.create(model=model_name, prompt=PROMPT_IDS, max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    assert one.choices[0].logprobs.token_logprobs[: len(PROMPT_IDS)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    # echo without logprobs and max_tokens 0: the prompt's text only
    bare = client.completions.create(model=model_name, prompt="Hello there", max_tokens=0, echo=True)
    assert bare.choices[0].text == "Hello there" and bare.choices[0].logprobs is None


def test_max_tokens_zero_needs_echo(http, model_name):
    """Catches: max_tokens 0 accepted without echo (an empty answer that says nothing)."""
    r = http.post("/v1/completions", json={"model": model_name, "prompt": "hi", "max_tokens": 0})
    assert_error(r, 400, "max_tokens")


def test_streamed_echo_logprobs_equal_the_response(client, model_name):
    """Catches: the streamed prompt chunk without logprobs, or text offsets of the
    generated tokens restarting at 0 after the echoed prompt."""
    kwargs = dict(model=model_name, prompt=PROMPT_IDS, max_tokens=5, temperature=0, echo=True, logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == whole.tokens
    assert [o for s in streamed for o in s.text_offset] == whole.text_offset
    assert [x for s in streamed for x in s.token_logprobs][1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-5)


def test_twenty_alternatives(client, model_name, http):
    """Catches: the old limit of 5 (completions) and a top list shorter than asked."""
    r = client.completions.create(model=model_name, prompt=PROMPT_IDS, max_tokens=2, temperature=0,
                                  echo=True, logprobs=20)
    check_legacy_logprobs(r.choices[0].logprobs, 20)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, temperature=0, logprobs=True, top_logprobs=20)
    assert all(len(e.top_logprobs) == 20 for e in chat.choices[0].logprobs.content)
    assert_error(http.post("/v1/completions", json={"model": model_name, "prompt": "x", "logprobs": 21}), 400,
                 "logprobs")
