"""Logprobs are the target's, in every mode: real `tandem serve` processes (ar, sd,
amusd) on the tiny float32 model, the OpenAI SDK as client, and transformers'
own forward pass of the same checkpoint as the reference."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.helpers import launch_server

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land far away,"]
NUM_TOP = 5


def scored(server) -> list:
    """Greedy echo+logprobs completions of PROMPTS, and the speculation stats summed."""
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    return [sdk.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, echo=True,
                                   logprobs=NUM_TOP) for p in PROMPTS]


@pytest.fixture(scope="module")
def by_mode(tiny_config) -> dict[str, list]:
    out = {}
    for mode in ("ar", "sd", "amusd"):
        with launch_server(tiny_config, mode=mode) as server:
            out[mode] = scored(server)
    return out


def test_logprobs_are_the_targets_distribution(by_mode, tiny_target_dir, smollm_tokenizer):
    """ar's prompt and generated logprobs equal log_softmax of transformers' logits for
    the whole sequence. Catches: prompt logprobs off by one position, logprobs of the
    warped instead of the target's distribution, generated logprobs from the wrong row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, torch_dtype=torch.float32).eval()
    for prompt, reply in zip(PROMPTS, by_mode["ar"]):
        prompt_ids = smollm_tokenizer.encode(prompt)
        lp = reply.choices[0].logprobs
        generated = reply.usage.completion_tokens
        assert len(lp.tokens) == len(prompt_ids) + generated
        # the generated ids: greedy, so each is the argmax of the reference's row
        with torch.no_grad():
            ids = list(prompt_ids)
            for _ in range(generated):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)  # [L, V]
        expected = reference[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)  # token i+1 given 0..i
        assert lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
        top_ids = reference[:-1].topk(NUM_TOP, dim=-1).indices  # [L-1, NUM_TOP]
        for row, top in zip(top_ids.tolist()[: len(prompt_ids) - 1], lp.top_logprobs[1 : len(prompt_ids)]):
            from server.tokenization import token_text

            assert {token_text(smollm_tokenizer, t) for t in row} <= set(top)


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_speculative_logprobs_equal_ar(by_mode, mode):
    """The same tokens and the same logprobs (prompt and generated, top 5) as ar's (float32;
    a k-row verification pass rounds its matmuls apart from 1-row steps by ~1e-5), with
    drafts really accepted. Catches: logprobs taken from the draft's distribution, or
    from the wrong row of a multi-token verification pass."""
    accepted = 0
    for ar, spec in zip(by_mode["ar"], by_mode[mode]):
        a, s = ar.choices[0].logprobs, spec.choices[0].logprobs
        assert s.tokens == a.tokens and s.text_offset == a.text_offset
        assert s.token_logprobs[0] is None
        assert s.token_logprobs[1:] == pytest.approx(a.token_logprobs[1:], abs=1e-4)
        for top_s, top_a in zip(s.top_logprobs[1:], a.top_logprobs[1:]):
            assert top_s.keys() == top_a.keys()
            assert list(top_s.values()) == pytest.approx(list(top_a.values()), abs=1e-4)
        accepted += spec.model_extra["speculation"]["num_accepted_tokens"]
    assert accepted > 0, "no draft was accepted: the comparison did not cover verification rows"
