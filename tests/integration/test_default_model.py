"""The real embedded SmolLM2 pair: every speculative mode equals ar in float32."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import launch_server

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def answers(mode: str) -> tuple[list[str], list[dict]]:
    from configs.loader import DEFAULT_CONFIG

    texts, stats = [], []
    with launch_server(DEFAULT_CONFIG, "--dtype", "float32", mode=mode) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        for question in QUESTIONS:
            reply = sdk.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": question}],
                max_tokens=32,
                temperature=0,
            )
            texts.append(reply.choices[0].message.content)
            stats.append(reply.model_extra["speculation"])
    return texts, stats


@pytest.fixture(scope="module")
def ar_answers(smollm_dir):
    texts, _ = answers("ar")
    assert "Paris" in texts[0]
    return texts


@pytest.mark.parametrize("mode", ["sd", "amusd", "easyspec"])
def test_default_model_equals_ar_float32(ar_answers, mode):
    texts, stats = answers(mode)
    assert texts == ar_answers
    assert sum(s["num_accepted_tokens"] for s in stats) > 0
