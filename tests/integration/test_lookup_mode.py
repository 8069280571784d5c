"""Modes `lookup` and `sd+lookup` through real processes: the launcher, the verify
worker (and in sd+lookup the draft worker), uvicorn, the OpenAI SDK; the tiny random
model in float32 (its int8 copy drafts in sd+lookup).

The random model does not repeat itself on its own; a repetition penalty below 1
makes it (the control runs in the target's rows), so the lookup finds matches in the
output and the target accepts them."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import launch_server
from tests.integration.test_server import ar_server  # noqa: F401  (a fixture)

PROMPTS = ["The quick brown fox", "one two three one two three one two"]
REPEAT = {"repetition_penalty": 0.3}  # rewards repeats: the output loops
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def lookup_server(tiny_config):
    with launch_server(tiny_config, mode="lookup") as server:
        yield server


@pytest.fixture(scope="module")
def hybrid_server(tiny_config):
    with launch_server(tiny_config, mode="sd+lookup") as server:
        yield server


def complete(server, prompt, **kwargs):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, **kwargs)


def test_lookup_runs_without_a_draft_worker(lookup_server):
    """One worker process: the verify worker (mode lookup starts no draft)."""
    assert len(lookup_server.worker_pids()) == 1


def test_lookup_greedy_equals_ar(ar_server, lookup_server):
    """Greedy text equals `ar`'s, plain and with the repetition control, and the
    looping output was drafted and mostly accepted (several tokens per target pass).
    Catches lookup drafts that reach the verifier at the wrong positions, or rows that
    count the drafts wrongly in the penalty (the text would part from ar's)."""
    for prompt in PROMPTS:
        for extra in ({}, REPEAT):
            ar = complete(ar_server, prompt, temperature=0, extra_body=extra)
            got = complete(lookup_server, prompt, temperature=0, extra_body=extra)
            assert got.choices[0].text == ar.choices[0].text, (prompt, extra)
            assert got.usage.completion_tokens == ar.usage.completion_tokens
    stats = got.model_extra["speculation"]  # the last: repeating prompt and output
    assert stats["num_accepted_tokens"] > 0
    assert stats["num_target_passes"] < MAX_TOKENS / 2
    assert lookup_server.metric("tandem:spec_decode_num_accepted_tokens_total") > 0


def test_lookup_seeded_sampling_is_reproducible(lookup_server):
    """A seeded sampled request gives the same text twice, another seed another text,
    with drafts verified."""
    def sampled(seed):
        reply = complete(lookup_server, PROMPTS[1], temperature=0.8, seed=seed, extra_body=REPEAT)
        return reply.choices[0].text, reply.model_extra["speculation"]

    first, stats = sampled(7)
    assert sampled(7)[0] == first
    assert sampled(8)[0] != first
    assert stats["num_draft_tokens"] > 0


def test_hybrid_greedy_equals_ar(ar_server, hybrid_server):
    """sd+lookup: the same text as ar, plain (mostly the model's drafts) and looping
    (mostly the lookup's), drafts verified in both. Catches a draft worker left
    behind by the rounds it did not draft (its next drafts would part from the target
    and, worse, a stale run-ahead could stall a round until the draft timeout)."""
    for extra in ({}, REPEAT):
        ar = complete(ar_server, PROMPTS[1], temperature=0, extra_body=extra)
        got = complete(hybrid_server, PROMPTS[1], temperature=0, extra_body=extra)
        assert got.choices[0].text == ar.choices[0].text, extra
        assert got.model_extra["speculation"]["num_accepted_tokens"] > 0
    assert len(hybrid_server.worker_pids()) == 2
