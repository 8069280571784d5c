"""Which token ids end a generation (server/launcher.py eos_token_ids)."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from server.launcher import eos_token_ids


def _tokenizer(eos: str) -> PreTrainedTokenizerFast:
    words = ["<unk>", "hello", "world", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token=eos)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]})
    return tok


def test_a_gguf_eos_plus_the_end_of_generation_specials(tmp_path):
    """Catches a GGUF model (one EOS in its metadata: Qwen's <|im_end|>) running past
    <|endoftext|>, where llama.cpp and the HF generation_config stop; <|im_start|> is special
    but does not end a generation."""
    tok = _tokenizer("<|im_end|>")
    assert eos_token_ids(tmp_path, tok) == (3, 4)


def test_config_eos_ids_are_added(tmp_path):
    """Catches generation_config.json's eos list being ignored."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    assert eos_token_ids(tmp_path, _tokenizer("<|im_end|>")) == (1, 3, 4)
