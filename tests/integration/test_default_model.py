"""The real embedded SmolLM2 pair: sd equals ar in float32."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import launch_server

pytestmark = pytest.mark.real_model


def test_default_model_sd_equals_ar_float32(smollm_dir):
    from configs.loader import DEFAULT_CONFIG

    texts = {}
    for mode in ("ar", "sd"):
        with launch_server(DEFAULT_CONFIG, "--dtype", "float32", mode=mode) as server:
            sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
            reply = sdk.chat.completions.create(
                model="SmolLM2-135M-Instruct",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
                temperature=0,
            )
            texts[mode] = reply.choices[0].message.content
            if mode == "sd":
                stats = reply.model_extra["speculation"]
                assert stats["num_accepted_tokens"] > 0
    assert texts["sd"] == texts["ar"]
    assert "Paris" in texts["ar"]
