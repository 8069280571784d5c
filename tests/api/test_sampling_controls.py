"""The sampling controls through the OpenAI SDK: accepted (OpenAI's own arguments, vLLM's
through extra_body), refused with a 400 naming the parameter, and delivered to the backend.

The first tests are backend-agnostic (the fake backend and a real `sd` server);
the last ones read what the fake backend was asked for.
"""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import TEST_MODEL_NAME

USER = [{"role": "user", "content": "Say something."}]
ALL_CONTROLS = dict(
    presence_penalty=0.5,
    frequency_penalty=0.3,
    logit_bias={"42": 5, "100": -100},
    extra_body=dict(repetition_penalty=1.2, min_p=0.05, min_tokens=2, stop_token_ids=[13], ignore_eos=True,
                    include_stop_str_in_output=True, skip_special_tokens=False, spaces_between_special_tokens=False),
)


def test_every_control_at_once_completions(client, model_name):
    reply = client.completions.create(model=model_name, prompt="Once upon", max_tokens=6, temperature=0.8, seed=1,
                                      **ALL_CONTROLS)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 2


def test_every_control_at_once_chat_with_prefill(client, model_name):
    messages = USER + [{"role": "assistant", "content": "Sure, here it is:"}]
    extra = dict(ALL_CONTROLS["extra_body"], continue_final_message=True, add_generation_prompt=False,
                 chat_template_kwargs={"unused_variable": 1})
    reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                           **{**ALL_CONTROLS, "extra_body": extra})
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 2


@pytest.mark.parametrize("args,param", [
    (dict(logit_bias={"1000000": 5}), "logit_bias"),
    (dict(logit_bias={"abc": 5}), "logit_bias"),
    (dict(logit_bias={"5": 150}), "logit_bias"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"repetition_penalty": -1.0}), "repetition_penalty"),
    (dict(extra_body={"min_p": 1.5}), "min_p"),
    (dict(extra_body={"min_p": -0.1}), "min_p"),
    (dict(extra_body={"min_tokens": 9}), "min_tokens"),  # more than max_tokens
    (dict(extra_body={"stop_token_ids": [10**7]}), "stop_token_ids"),
    (dict(extra_body={"ignore_eos": "yes"}), "ignore_eos"),
])
def test_bad_values_are_400s_naming_the_parameter(client, model_name, args, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", max_tokens=4, **args)
    error = info.value.body
    assert error["param"].split("[")[0] == param, error
    assert info.value.status_code == 400


@pytest.mark.parametrize("extra,needle", [
    ({"continue_final_message": True}, "add_generation_prompt"),  # both on: refused, as vLLM does
    ({"continue_final_message": True, "add_generation_prompt": False}, "assistant"),  # nothing to continue
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "add_generation_prompt"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
])
def test_bad_chat_template_options_are_400s(client, model_name, extra, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=USER, max_tokens=4, extra_body=extra)
    assert needle in info.value.body["message"]


# -- what the backend is asked for (the fake backend records its requests) -------------------------


@pytest.fixture
def fake_client(fake_server_url):
    with openai.OpenAI(base_url=f"{fake_server_url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_controls_reach_the_backend(fake_client, app_engine, app_settings):
    """Catches a control accepted by the API and lost on the way (not put into SamplingParams)."""
    before = len(app_engine.requests)
    fake_client.completions.create(model=TEST_MODEL_NAME, prompt="hello", max_tokens=5, n=2, temperature=0.7,
                                   seed=3, **ALL_CONTROLS)
    submitted = app_engine.requests[before:]
    assert len(submitted) == 2
    for request in submitted:
        s = request.sampling
        assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_p, s.min_tokens) == (
            0.5, 0.3, 1.2, 0.05, 2)
        assert s.logit_bias == {42: 5.0, 100: -100.0}
        assert request.stop_token_ids == [13]  # ignore_eos: the EOS does not end the choice


def test_stop_token_ids_add_to_eos(fake_client, app_engine, app_settings):
    before = len(app_engine.requests)
    fake_client.completions.create(model=TEST_MODEL_NAME, prompt="hello", max_tokens=3,
                                   extra_body={"stop_token_ids": [13, 14]})
    (request,) = app_engine.requests[before:]
    assert request.stop_token_ids == [*app_settings.eos_token_ids, 13, 14]
    assert request.sampling.min_tokens == 0 and request.sampling.logit_bias == {}


def test_assistant_prefill_ends_the_prompt(fake_client, app_engine, smollm_tokenizer):
    """continue_final_message: the prompt ends inside the assistant's message (no end-of-turn)."""
    before = len(app_engine.requests)
    messages = USER + [{"role": "assistant", "content": "Sure, here it is:"}]
    fake_client.chat.completions.create(model=TEST_MODEL_NAME, messages=messages, max_tokens=3, extra_body=dict(
        continue_final_message=True, add_generation_prompt=False))
    fake_client.chat.completions.create(model=TEST_MODEL_NAME, messages=USER, max_tokens=3)
    prefill, plain = (smollm_tokenizer.decode(r.prompt_ids) for r in app_engine.requests[before:])
    assert prefill.endswith("<|im_start|>assistant\nSure, here it is:")
    assert plain.endswith("Say something.<|im_end|>\n<|im_start|>assistant\n")
