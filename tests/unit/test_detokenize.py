"""Incremental detokenization and stop strings on the real SmolLM2 tokenizer
(byte-level BPE: emoji and CJK characters are split over several tokens)."""

from __future__ import annotations

import random

import pytest

from protocol.messages import GenerateRequest, SamplingParams, TokenOutput
from server.serving import ChoiceState
from server.tokenization import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher, token_bytes

TRICKY = [
    "Hello world",
    "Hello 🤗 世界  wörld",
    "家族 👨‍👩‍👧 and 🚀🚀🚀 rockets",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\nnew\n\nlines",
    "Ünïcödé façade, naïve café, Ångström, ß, ﬁ ligature",
    "日本語のテキストと中文文本和한국어",
    "combining: e\u0301 a\u0308 and zero\u200bwidth",
    "math ∑∫√∞ ≠ ≤ ≥ and arrows → ← ↔",
]


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


def stream(tok, ids, context=()):
    """Feed ids one at a time; return the pieces (the flush last)."""
    detok = IncrementalDetokenizer(tok, context)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TRICKY)
def test_incremental_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    # A multi-byte character is never emitted in halves.
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    assert pieces[-1] == ""  # valid UTF-8: nothing was left held back


def test_split_emoji_is_held_until_complete(tok):
    ids = tok.encode(" 🤗", add_special_tokens=False)
    assert len(ids) > 1  # the emoji spans several byte tokens
    pieces = stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1)
    assert pieces[len(ids) - 1] == " 🤗"


def test_random_token_streams_match_decode(tok):
    rng = random.Random(1234)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 60))]
        assert "".join(stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_incomplete_character_is_released_at_the_end(tok):
    ids = tok.encode("ok 🤗", add_special_tokens=False)[:-1]  # cut inside the emoji
    pieces = stream(tok, ids)
    assert "".join(pieces[:-1]) == "ok"
    assert pieces[-1].strip() == REPLACEMENT_CHAR  # what a full decode shows
    assert "".join(pieces) == tok.decode(ids)


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("done", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(stream(tok, ids)) == "done"


def test_prompt_context_continues_the_text(tok):
    prompt = tok.encode("Once upon a time, 世", add_special_tokens=False)
    out = tok.encode(" there was 🤗 a fox", add_special_tokens=False)
    full, head = tok.decode(prompt + out), tok.decode(prompt)
    assert "".join(stream(tok, out, context=prompt)) == full[len(head):]


def test_token_bytes_concatenate_to_the_text(tok):
    ids = tok.encode(TRICKY[2], add_special_tokens=False)
    assert b"".join(token_bytes(tok, t) for t in ids).decode("utf-8") == TRICKY[2]


# -- stop strings ---------------------------------------------------------------------


def matched(pieces, stops):
    """Run text pieces through a matcher: (emitted text, hit)."""
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_string_spanning_pieces():
    assert matched(["Hel", "lo wo", "rld"], ["o w"]) == ("Hell", True)
    assert matched(["a", "b", "c", "d"], ["bc"]) == ("a", True)


def test_earliest_stop_string_wins():
    assert matched(["one two three"], ["three", "two"]) == ("one ", True)
    assert matched(["ab", "cd"], ["bcd", "cd"]) == ("a", True)


def test_held_text_is_released_when_it_cannot_be_a_stop():
    matcher = StopStringMatcher(["xyz"])
    assert matcher.feed("abx") == ("ab", False)  # "x" might start "xyz"
    assert matcher.feed("y") == ("", False)
    assert matcher.feed("q") == ("xyq", False)
    assert matcher.feed("ends with x") == ("ends with ", False)
    assert matcher.flush() == "x"


def test_no_stop_strings_passes_text_through():
    assert matched(["a", "b"], []) == ("ab", False)


def test_stop_string_over_token_boundaries_real_tokens(tok):
    text = "The quick brown fox 🤗 jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in ids]
    for stop, expected in [("k br", "The quic"), ("🤗 j", "The quick brown fox "), ("dog", "The quick brown fox 🤗 jumps over the lazy ")]:
        assert matched(pieces, [stop]) == (expected, True)


class _NullTracker:
    def on_output(self, output, num_tokens):
        pass

    def on_finish(self, reason):
        pass


def choice(tok, stops, num_logprobs=None):
    request = GenerateRequest("r", [1, 2], 100, SamplingParams(), [tok.eos_token_id], num_logprobs)
    return ChoiceState(0, request, tok, stops, _NullTracker())


def test_choice_cuts_at_stop_string_and_drops_later_tokens(tok):
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    state = choice(tok, ["a gam"], num_logprobs=0)
    output = TokenOutput("r", ids, logprobs=[-0.5] * len(ids), top_logprobs=[[]] * len(ids))
    delta = state.process(output)
    assert delta.finish_reason == "stop" and state.text == delta.text == "alpha bet"
    # Tokens up to the one completing the stop string count; later ones are dropped.
    kept = next(k for k in range(1, len(ids) + 1) if "a gam" in tok.decode(ids[:k]))
    assert state.num_tokens == kept == len(delta.tokens) < len(ids)


def test_choice_releases_held_text_at_finish(tok):
    ids = tok.encode("one two thr", add_special_tokens=False)
    state = choice(tok, ["three"])
    first = state.process(TokenOutput("r", ids[:-1]))
    last = state.process(TokenOutput("r", ids[-1:], finish_reason="length"))
    assert last.finish_reason == "length"
    assert first.text + last.text == state.text == "one two thr"


def test_choice_eos_is_not_in_the_text(tok):
    ids = tok.encode("bye", add_special_tokens=False) + [tok.eos_token_id]
    state = choice(tok, [])
    delta = state.process(TokenOutput("r", ids, finish_reason="stop"))
    assert (delta.text, delta.finish_reason, state.num_tokens) == ("bye", "stop", len(ids))
