"""Shared fixtures: the embedded model's checkpoint and tiny random models."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_pair, write_config

# Tiny models: one thread is fastest, and on a 2-core box shared with worker
# processes, more threads only fight over the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm_dir():
    """The embedded SmolLM2 checkpoint (converted once, then cached)."""
    from workers.model import resolve_checkpoint

    return resolve_checkpoint("embedded:smollm2-135m-instruct", progress=lambda line: None)


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    """The embedded SmolLM2's tokenizer (the tiny models' too)."""
    from workers.model import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, smollm_dir):
    """A tiny random Llama with SmolLM2's tokenizer: servable, fast."""
    from tests.tiny_model import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-target"), tokenizer_dir=smollm_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_stranger_dir(tmp_path_factory, smollm_dir):
    """Differently seeded weights: a draft that disagrees with the target almost always."""
    from tests.tiny_model import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-stranger"), tokenizer_dir=smollm_dir, seed=1)


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory, tiny_target_dir):
    """Config for a server on the tiny model: float32, int8 draft of the same weights."""
    return write_config(
        tmp_path_factory.mktemp("config") / "tiny.yaml",
        **tiny_pair(tiny_target_dir),
    )
