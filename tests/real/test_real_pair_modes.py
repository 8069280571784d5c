"""The real Qwen2.5-Coder pair served (`make test-real`; deselected from `make test`).

Every speculative mode's greedy output equals `ar`'s on the same weights in float32
activations (the target is the GGUF's own int4 blocks in every mode), through the real
server and the OpenAI SDK; the reduced draft head proposes tokens that get accepted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import greedy_chat_answers

pytestmark = pytest.mark.real_pair

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "qwen2.5-coder.yaml"
MODEL = "Qwen2.5-Coder-1.5B-Instruct"
QUESTIONS = [
    "Write a Python function that checks whether a number is prime.",
    "What does the SQL keyword JOIN do? Answer in two sentences.",
]


def answers(mode: str) -> tuple[list[str], list[dict]]:
    return greedy_chat_answers(CONFIG, mode, MODEL, QUESTIONS, max_tokens=40, timeout_s=600)


@pytest.fixture(scope="module")
def ar_answers():
    texts, _ = answers("ar")
    assert "def " in texts[0] and "prime" in texts[0].lower()
    return texts


@pytest.mark.parametrize("mode", ["sd", "amusd", "easyspec"])
def test_real_pair_mode_equals_ar_float32(ar_answers, mode):
    """Catches a verification pass that computes rows differently from a decode step (a
    kernel that is not batch-invariant), or an acceptance bug, on the real weights."""
    texts, stats = answers(mode)
    assert texts == ar_answers
    assert sum(s["num_accepted_tokens"] for s in stats) > 0
