"""The CUDA tests' fixtures: a GPU is required (`make test-gpu` selects these tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def cuda_device():
    """These tests were asked for by name (-m cuda): no GPU is a failure, not a skip."""
    if not torch.cuda.is_available():
        pytest.fail("the cuda tests need a CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda:0")


@pytest.fixture(scope="session")
def smollm_dir():
    """The embedded model's tokenizer for the tiny models. A GPU box without a package index
    cannot install the embedded package: TANDEM_TOKENIZER_DIR names a folder holding its
    tokenizer files instead."""
    if os.environ.get("TANDEM_TOKENIZER_DIR"):
        return Path(os.environ["TANDEM_TOKENIZER_DIR"])
    from workers.model import resolve_checkpoint

    return resolve_checkpoint("embedded:smollm2-135m-instruct", progress=lambda line: None)
