"""The real embedded SmolLM2 pair: every speculative mode equals ar in float32."""

from __future__ import annotations

import pytest

from configs.loader import DEFAULT_CONFIG
from tests.helpers import greedy_chat_answers

pytestmark = pytest.mark.real_model

QUESTIONS = ["What is the capital of France?", "Write a Python function that reverses a string."]


def answers(mode: str) -> tuple[list[str], list[dict]]:
    return greedy_chat_answers(DEFAULT_CONFIG, mode, "SmolLM2-135M-Instruct", QUESTIONS, max_tokens=32)


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
