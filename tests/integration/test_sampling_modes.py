"""Each sampling control through real servers in every speculative mode: greedy float32
output, and seeded sampled output, equals the target alone (`ar`) with the control on.

Real processes (launcher, verify and draft workers over ZeroMQ, uvicorn), the OpenAI
SDK as client, the tiny random model. A verifier whose rows saw the wrong drafts,
or a draft worker that lost the request's controls, parts from `ar` here.
"""

from __future__ import annotations

import openai
import pytest

from tests.helpers import TINY_EASYSPEC_SECTIONS, launch_server, write_config

PROMPT = "The quick brown fox"
MAX_TOKENS = 24

# name -> completion arguments (greedy); min_p is argmax-invariant: it rides along to show it breaks nothing.
# The random tiny model never repeats itself, so the penalties here reward repeats (r < 1, negative
# penalties): then the text changes, and the rows' counts of the drafts before them decide it.
CASES = {
    "repetition_penalty": dict(extra_body={"repetition_penalty": 0.3}),
    "frequency_presence": dict(frequency_penalty=-1.5, presence_penalty=-1.0),
    "logit_bias": dict(logit_bias={"1000": 6, "2000": 6, "3000": 5.5, "4000": 5.5, "5000": 5}),
    "all": dict(frequency_penalty=-0.5, logit_bias={"1500": 5.5}, extra_body={"repetition_penalty": 0.5, "min_p": 0.2}),
}
PREFILL = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def answers(server, stop_token: int) -> dict[str, tuple[str, int, str]]:
    """(text, completion tokens, finish reason) for every case, plain, min_tokens and the prefill."""
    client = sdk(server)
    out = {}

    def complete(name, **kwargs):
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, **kwargs)
        choice = reply.choices[0]
        out[name] = (choice.text, reply.usage.completion_tokens, choice.finish_reason)
        return reply

    complete("plain")
    for name, kwargs in CASES.items():
        complete(name, **kwargs)
    complete("stop_token", extra_body={"stop_token_ids": [stop_token]})
    complete("min_tokens", extra_body={"stop_token_ids": [stop_token], "min_tokens": 12})
    complete("eos_biased", logit_bias={"2": 100})  # 2: <|im_end|>, an EOS
    complete("ignore_eos", logit_bias={"2": 100}, extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(
        model="tiny", messages=PREFILL, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "repetition_penalty": 0.5},
    )
    out["prefill"] = (reply.choices[0].message.content, reply.usage.completion_tokens, reply.choices[0].finish_reason)
    for seed in (5, 6):  # seeded sampling, with controls: each token its position's race over the target's p
        reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=1.0,
                                          top_p=0.9, seed=seed, frequency_penalty=-0.5)
        out[f"sampled {seed}"] = (reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason)
    return out


@pytest.fixture(scope="module")
def ar(tiny_config, smollm_tokenizer):
    with launch_server(tiny_config, mode="ar") as server:
        plain = sdk(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        stop_token = smollm_tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[2]
        yield answers(server, stop_token), stop_token


def test_every_control_changes_ar_output(ar):
    """The controls act on the target alone: otherwise the equalities below prove nothing."""
    got, _ = ar
    for name in CASES:
        assert got[name][0] != got["plain"][0], name
    assert got["stop_token"][2] == "stop" and got["stop_token"][1] <= 3
    assert got["min_tokens"][1] >= 12
    assert got["eos_biased"][1:] == (1, "stop")
    assert got["ignore_eos"][1:] == (MAX_TOKENS, "length")  # the same EOS, emitted every time, ends nothing
    assert got["sampled 5"][0] != got["sampled 6"][0] != got["plain"][0]  # the seed is used


@pytest.fixture(scope="module", params=["sd", "amusd", "easyspec", "amusd+easyspec", "lookup"])
def spec_server(request, tiny_config, tiny_target_dir, tmp_path_factory):
    config = tiny_config
    if "easyspec" in request.param:
        config = write_config(
            tmp_path_factory.mktemp("easyspec") / "easyspec.yaml",
            target={"path": str(tiny_target_dir), "dtype": "float32"},
            draft={"path": str(tiny_target_dir), "dtype": "float32"},
            **TINY_EASYSPEC_SECTIONS,
        )
    with launch_server(config, mode=request.param) as server:
        yield server


def test_speculative_modes_equal_ar_with_each_control(ar, spec_server):
    expected, stop_token = ar
    got = answers(spec_server, stop_token)
    assert got == expected
    assert spec_server.metric("tandem:spec_decode_num_draft_tokens_total") > 0
