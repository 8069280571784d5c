"""Tiny random-weight Llama checkpoints for tests (seconds to build, deterministic)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def make_tiny_checkpoint(
    directory: Path,
    *,
    n_layers: int = 2,
    dim: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    max_position_embeddings: int = 4096,
    attention_bias: bool = False,
    initializer_range: float = 0.2,
) -> Path:
    """Save a random-weight LlamaForCausalLM (tied embeddings) as config.json + model.safetensors.

    With tokenizer_dir, its tokenizer files are copied along and vocab_size
    defaults to len(tokenizer); otherwise vocab_size defaults to 256.
    initializer_range is large so logits are far from uniform and greedy
    decoding produces varied tokens.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bos = eos = None
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if vocab_size is None:
            vocab_size = len(tok)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy(Path(tokenizer_dir) / name, directory / name)
    if vocab_size is None:
        vocab_size = 256
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=dim // n_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_bias=attention_bias,
        initializer_range=initializer_range,
        bos_token_id=bos if bos is not None else 1,
        eos_token_id=eos if eos is not None else 2,
        pad_token_id=None,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        if name.endswith("norm.weight"):
            # near 1, but not exactly, so a wrong norm weight shows up in the tests
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            t = initializer_range * torch.randn(p.shape, generator=gen)
        state[name] = t.contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    return directory


def make_digit_tokenizer(directory: Path, num_digits: int = 7) -> Path:
    """A byte-level tokenizer whose tokens are the digits 0..num_digits-1 and EOS
    "</s>" (id num_digits): a vocabulary small enough for distribution tests, on
    which a JSON integer grammar is a non-trivial mask (a leading 0 ends the number)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab={str(i): i for i in range(num_digits)}, merges=[], unk_token=None))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens([AddedToken("</s>", special=True)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>").save_pretrained(directory)
    return Path(directory)
