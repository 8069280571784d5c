"""Tandem's compact Llama-family runtime: model, static KV cache, loading, checkpoints."""

from .args import ModelArgs
from .cache import KVCache
from .checkpoints import check_same_tokenizer, load_tokenizer, resolve_checkpoint
from .loader import load_model
from .model import LlamaModel, Positions

__all__ = [
    "ModelArgs",
    "LlamaModel",
    "KVCache",
    "Positions",
    "load_model",
    "resolve_checkpoint",
    "load_tokenizer",
    "check_same_tokenizer",
]
