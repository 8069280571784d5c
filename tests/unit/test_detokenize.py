"""Incremental detokenization and stop strings on the real SmolLM2 tokenizer
(byte-level BPE: emoji and CJK characters are split over several tokens)."""

from __future__ import annotations

import random

import pytest

from protocol.messages import GenerateRequest, SamplingParams, TokenOutput
from server.serving import ChoiceState, TextOptions
from server.tokenization import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher, render_chat, token_bytes

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


# -- the text options (vLLM's include_stop_str_in_output, min_tokens, skip_special_tokens) ----------


def options_choice(tok, stops, stop_ids, **options):
    request = GenerateRequest("r", [1, 2], 100, SamplingParams(), stop_ids)
    return ChoiceState(0, request, tok, stops, _NullTracker(), TextOptions(**options))


def test_include_stop_str_keeps_the_stop_string():
    """The text runs to the end of the stop string, and nothing after it."""
    matcher = StopStringMatcher(["a gam"], include_stop=True)
    assert matcher.feed("alpha beta") == ("alpha bet", False)  # the last "a" could start it: held
    assert matcher.feed(" gamma") == ("a gam", True)


def test_include_stop_str_keeps_the_first_stop_to_complete():
    matcher = StopStringMatcher(["abc", "ab"], include_stop=True)
    assert matcher.feed("xabcd") == ("xab", True)


def test_stop_token_text_only_with_include_stop_str(tok):
    """A stop token that is a word (stop_token_ids) ends the text before it, as in vLLM;
    include_stop_str_in_output keeps it. Catches a stop token leaking into the text."""
    ids = tok.encode("one two three", add_special_tokens=False)
    for include, expected in ((False, tok.decode(ids[:-1])), (True, "one two three")):
        state = options_choice(tok, [], [ids[-1]], include_stop_str=include)
        delta = state.process(TokenOutput("r", ids, finish_reason="stop"))
        assert (delta.text, delta.finish_reason, state.num_tokens) == (expected, "stop", len(ids))


def test_stop_strings_count_only_from_min_tokens_on(tok):
    """With min_tokens 3 a stop string inside the first two tokens does not end the output."""
    ids = tok.encode("stop here, stop there", add_special_tokens=False)
    assert "stop" in tok.decode(ids[:2]) and len(ids) > 4
    early = options_choice(tok, ["stop"], [], min_tokens=0).process(TokenOutput("r", ids))
    assert early.text == "" and early.finish_reason == "stop"
    state = options_choice(tok, ["stop"], [], min_tokens=3)
    delta = state.process(TokenOutput("r", ids))
    assert delta.text == "stop here, " and delta.finish_reason == "stop"


def test_skip_special_tokens_false_shows_them(tok):
    ids = tok.encode("<|im_start|>hi<|im_end|> there", add_special_tokens=False)
    assert options_choice(tok, [], [], skip_special_tokens=True).process(TokenOutput("r", ids)).text == "hi there"
    shown = options_choice(tok, [], [], skip_special_tokens=False).process(TokenOutput("r", ids)).text
    assert shown == "<|im_start|>hi<|im_end|> there"


def test_chat_template_options(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, here"}]
    prefill = tok.decode(render_chat(tok, messages, add_generation_prompt=False, continue_final_message=True))
    assert prefill.endswith("<|im_start|>assistant\nSure, here")  # the assistant's turn left open
    closed = tok.decode(render_chat(tok, messages[:1], add_generation_prompt=False))
    assert closed.endswith("hi<|im_end|>\n")  # no assistant turn opened
    assert tok.decode(render_chat(tok, messages[:1])).endswith("<|im_start|>assistant\n")


def test_chat_template_kwargs_reach_the_template(tok):
    import copy

    custom = copy.copy(tok)
    custom.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ greeting | default('none') }}"
    assert tok.decode(render_chat(custom, [{"role": "user", "content": "a"}])) == "anone"
    with_kwargs = render_chat(custom, [{"role": "user", "content": "a"}], template_kwargs={"greeting": "hello"})
    assert tok.decode(with_kwargs) == "ahello"
