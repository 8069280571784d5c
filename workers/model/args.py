"""ModelArgs: the shape of a Llama-family network, read from a HF config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool = False
    rope_type: str = "default"
    # rope scaling parameters as sorted (key, value) pairs (hashable; frozen dataclass)
    rope_scaling: tuple = ()
    sliding_window: int | None = None  # attention window; we refuse caches longer than it
    model_type: str = "llama"

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported by the Tandem runtime "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if config.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
        # transformers 5 writes rope_parameters {rope_theta, rope_type, ...};
        # older configs have rope_theta + rope_scaling at top level.
        rope = dict(config.get("rope_parameters") or {})
        if config.get("rope_scaling"):
            rope = {**dict(config["rope_scaling"]), **rope}
        rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        scaling = tuple(
            sorted((k, v) for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type"))
        )

        n_heads = config["num_attention_heads"]
        dim = config["hidden_size"]
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            layer_types = config.get("layer_types") or []
            uses_window = config.get("use_sliding_window") or "sliding_attention" in layer_types
            sliding = config.get("sliding_window") if uses_window else None
        else:
            qkv_bias = o_bias = bool(config.get("attention_bias", False))
            sliding = config.get("sliding_window") if model_type == "mistral" else None
        return cls(
            vocab_size=config["vocab_size"],
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or dim // n_heads,
            intermediate_size=config["intermediate_size"],
            rope_theta=rope_theta,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_type=rope_type,
            rope_scaling=scaling,
            sliding_window=sliding,
            model_type=model_type,
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2], float32, as transformers computes them."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        p = dict(self.rope_scaling)
        if self.rope_type == "linear":
            inv = inv / float(p["factor"])
        elif self.rope_type == "llama3":
            factor = float(p["factor"])
            low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old_len = float(p["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv = torch.where(medium, smoothed, scaled)
        return inv
