"""Tandem's compact Llama-family runtime: model, static KV cache, loading, checkpoints.

The names below load their submodule on first use, so that importing a
torch-free submodule (`workers.model.embedded`, used by `tandem models install`)
does not import torch.
"""

import importlib

_EXPORTS = {
    "ModelArgs": ".args",
    "LlamaModel": ".model",
    "KVCache": ".cache",
    "Positions": ".model",
    "load_model": ".loader",
    "resolve_checkpoint": ".checkpoints",
    "load_tokenizer": ".checkpoints",
    "check_same_tokenizer": ".checkpoints",
    "make_tiny_checkpoint": ".tiny",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
