"""Prompt lookup's matcher (workers/engine/prompt_lookup.py): the plain search and its
incremental index, which must agree."""

from __future__ import annotations

import random

import pytest

from protocol.messages import GenerateRequest, SamplingParams
from workers.engine.prompt_lookup import NgramIndex, PromptLookup, lookup
from workers.engine.request import Request


@pytest.mark.parametrize(
    "tokens,k,min_n,max_n,expected",
    [
        # the last two tokens recur: what followed them, then the copy goes on
        ([1, 2, 3, 4, 1, 2], 3, 1, 3, [3, 4, 1]),
        # the most recent occurrence, not the first
        ([1, 2, 9, 1, 2, 8, 1, 2], 3, 2, 2, [8, 1, 2]),
        # a longer n-gram wins over a more recent shorter one
        ([5, 1, 2, 7, 3, 1, 2, 8, 5, 1, 2], 1, 2, 3, [7]),
        # only a 1-gram recurs: nothing at min_n 2, a proposal at min_n 1
        ([1, 2, 3, 1], 2, 2, 3, []),
        ([1, 2, 3, 1], 2, 1, 3, [2, 3]),
        # the copy overlaps the proposal: a period-2 repetition proposes k tokens, not 2
        ([1, 2, 1, 2, 1, 2], 5, 2, 2, [1, 2, 1, 2, 1]),
        ([7, 7, 7], 4, 1, 2, [7, 7, 7, 7]),
        # nothing recurs; k 0; too short to hold an earlier occurrence
        ([1, 2, 3, 4], 3, 1, 3, []),
        ([1, 2, 1, 2], 0, 1, 3, []),
        ([5], 3, 1, 3, []),
        ([], 3, 1, 3, []),
    ],
)
def test_lookup_examples(tokens, k, min_n, max_n, expected):
    """The search's contract, case by case; the index gives the same. Catches an
    off-by-one that matches the suffix with itself (a proposal where nothing
    recurs), picking the first occurrence, or trying short n-grams first."""
    assert lookup(tokens, k, min_n, max_n) == expected
    assert NgramIndex(min_n, max_n, tokens).propose(k) == expected


@pytest.mark.parametrize("seed", range(6))
def test_index_agrees_with_search_as_tokens_arrive(seed):
    """Tokens appended in chunks of random size (prompt, then rounds' emitted tokens)
    over a small vocabulary (many matches): after every chunk the index proposes
    what the plain search proposes. Catches ends indexed twice or skipped at a chunk
    boundary (a stale or missing latest occurrence)."""
    rng = random.Random(seed)
    min_n, max_n = rng.choice([(1, 1), (1, 3), (2, 4), (3, 5)])
    index = NgramIndex(min_n, max_n)
    tokens: list[int] = []
    proposed = 0
    while len(tokens) < 400:
        chunk = [rng.randrange(4 if seed % 2 else 12) for _ in range(rng.randint(0, 6))]
        tokens += chunk
        index.extend(chunk)
        k = rng.randint(0, 6)
        expected = lookup(tokens, k, min_n, max_n)
        assert index.propose(k) == expected, (len(tokens), k)
        proposed += bool(expected)
    assert index.tokens == tokens
    assert proposed > 10  # the comparison covered real proposals


def test_index_rejects_bad_lengths():
    with pytest.raises(ValueError):
        NgramIndex(0, 3)
    with pytest.raises(ValueError):
        NgramIndex(3, 2)


def _request(prompt):
    return Request.from_message(GenerateRequest("r", prompt, 16, SamplingParams(), []))


def test_prompt_lookup_source_follows_the_request():
    """The DraftSource: indexes the prompt on admission, the emitted tokens after each
    round, proposes one-hot drafts (no q), forgets a released request. Catches a
    source that proposes from the prompt only (the output's repeats never drafted)."""
    source = PromptLookup(num_draft_tokens=3, min_n=2, max_n=3)
    request = _request([10, 11, 12, 13, 20, 21])
    source.on_admit(request, 3)
    assert source.propose(request, 3).token_ids == []  # nothing recurs yet
    request.output_ids += [10, 11]
    source.on_verified(request, [10, 11], 3)
    proposal = source.propose(request, 3)
    assert (proposal.token_ids, proposal.available) == ([12, 13, 20], 3)
    request.output_ids += [12, 13, 20, 21]
    source.on_verified(request, [12, 13, 20, 21], 3)
    assert source.propose(request, 2).token_ids == [10, 11]  # the output's own repeat
    source.release("r")
    source.release("r")  # twice: harmless
    with pytest.raises(KeyError):
        source.propose(request, 2)


def test_mode_lookup_in_the_config():
    """Mode lookup starts the verify worker alone; its n-gram bounds are validated.
    Catches a lookup row that would start (and wait for) a draft worker."""
    from configs.loader import ConfigError, load_config

    config = load_config(speculation__mode="lookup", speculation__prompt_lookup_max=5)
    assert config.mode.roles == ("verify",) and config.mode.lookup
    assert (config.speculation.prompt_lookup_min, config.speculation.prompt_lookup_max) == (2, 5)
    for low, high in [(0, 3), (4, 3)]:
        with pytest.raises(ConfigError, match="prompt_lookup"):
            load_config(speculation__prompt_lookup_min=low, speculation__prompt_lookup_max=high)
