"""Load Llama-family weights (Hugging Face safetensors, or a GGUF file) into LlamaModel.

Fuses q/k/v into `wqkv` and gate/up into `w13` at load time, and optionally
quantizes every decoder linear (and the output head) for a draft.

Quantization of the decoder linears:
- "none": every weight in the model dtype (a GGUF file's blocks de-quantized exactly).
- "int8": weight-only, quantized from the float weights.
- "int4": weight-only; a GGUF file's 4-bit blocks (Q4_0/Q4_1/Q4_K) become int4 as they
  are (see gguf_file.py), every other weight is quantized from its float values.
- "gguf": serve a GGUF file's own weights, nothing re-quantized. On a CPU with
  AVX512-VNNI or AVX2 + FMA, every Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 tensor as stored, computed by our
  qgemm kernel (qlinear.py); elsewhere 4-bit blocks as int4 for torch's kernel and the
  other types de-quantized to the model dtype. The head follows the same rule.
- "gguf-q4": for a draft (any draft is lossless: the target verifies it): as "gguf", but
  the Q5_0/Q6_K/Q8_0 tensors, the head's too, re-quantized to 4-bit groups of 32 with float16
  scales and mins (Q4_1's form as GGUF stores it, QuantParts.quantize_4bit) for qgemm: a pass
  reads about 5/9 of their bytes, and on AVX2 qgemm's byte path costs two multiply-adds per
  pair where nibbles cost one. Without qgemm it is "gguf".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs.choices import GGUF_QUANTIZATIONS, QUANTIZATIONS, check_choice

from .args import ModelArgs
from .checkpoints import GGUF_WEIGHTS
from .gguf_file import GGUFFile
from .linear import ConcatLinear, Float32Linear, Int4Linear, Int4Parts, RowWise, int4_group_size, make_linear, quantize_int4
from .model import LlamaModel
from .qlinear import MAX_ROWS, QLinear, QuantParts, kernel_available
from .tensor_split import AllReduced, ShardedWeights, TensorSplit


class _Weights:
    """Lazy access to the tensors of one or more safetensors files, by HF name (float)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path} (only safetensors checkpoints are supported)")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ValueError(f"checkpoint {self.path} has no tensor {name!r}")
        return self._where[name].get_tensor(name)

    def maybe(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self._where else None

    def is_int4(self, name: str) -> bool:  # safetensors hold floats
        return False

    def is_quantized(self, name: str) -> bool:
        return False

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def int4(self, name: str) -> Int4Parts:
        raise ValueError(f"{name} is stored as float in {self.path}")


def open_weights(path: Path) -> _Weights | GGUFFile:
    """The tensors of a resolved checkpoint directory: its safetensors, or its GGUF file."""
    if (path / GGUF_WEIGHTS).exists() and not any(path.glob("*.safetensors")):
        return GGUFFile(path / GGUF_WEIGHTS)
    return _Weights(path)


def _serves_qgemm(w: _Weights | GGUFFile, quant: str, device: torch.device) -> bool:
    """Whether "gguf" (or "gguf-q4") serves this file's quantized tensors with our qgemm kernel."""
    w = w.weights if isinstance(w, ShardedWeights) else w
    return quant in GGUF_QUANTIZATIONS and device.type == "cpu" and isinstance(w, GGUFFile) and kernel_available()


def _as_served(parts: QuantParts, quant: str) -> QuantParts:
    """A GGUF tensor's blocks as qgemm serves them: as stored, or (gguf-q4) wider than 4 bits
    re-quantized to 4-bit groups with float16 scales."""
    return QuantParts.quantize_4bit(parts.dequantize()) if quant == "gguf-q4" and not parts.nibbles else parts


def _storage(w: _Weights | GGUFFile, name: str, quant: str, device: torch.device):
    """How one weight tensor is served: QuantParts (our qgemm kernel), Int4Parts (torch's int4
    kernel), or None (dense, in the model dtype)."""
    if _serves_qgemm(w, quant, device) and w.is_quantized(name):
        return _as_served(w.quant(name), quant)
    if quant in ("int4", *GGUF_QUANTIZATIONS) and w.is_int4(name):
        return w.int4(name)
    if quant == "int4":
        return quantize_int4(w.get(name), int4_group_size(w.shape(name)[1]))
    return None


def _kind(parts) -> tuple:
    if isinstance(parts, QuantParts):
        return ("qgemm", *parts.kind())
    if isinstance(parts, Int4Parts):
        return ("int4", parts.group)
    return ("dense",)


def _linear(w: _Weights | GGUFFile, names: list[str], bias: torch.Tensor | None, quant: str, dtype, device) -> nn.Module:
    """One (fused) linear from the tensors `names` (stacked along the output), stored per `quant`.

    Under "int4", "gguf" and "gguf-q4" each tensor is stored as _storage says; consecutive tensors of one
    kind share one module, and a fusion of several kinds (a GGUF layer whose q/k are 4-bit and
    whose v is 6-bit) becomes a ConcatLinear of them.
    """
    if quant not in ("int4", *GGUF_QUANTIZATIONS):
        weight = torch.cat([w.get(n) for n in names], dim=0) if len(names) > 1 else w.get(names[0])
        return make_linear(weight, bias, quant, dtype, device)
    stored = [_storage(w, n, quant, device) for n in names]
    runs: list[list[int]] = []  # indices of consecutive tensors of one kind
    for i, parts in enumerate(stored):
        if runs and _kind(stored[runs[-1][0]]) == _kind(parts):
            runs[-1].append(i)
        else:
            runs.append([i])
    modules, row = [], 0
    for run in runs:
        rows = sum(w.shape(names[i])[0] for i in run)
        run_bias = None if bias is None else bias[row : row + rows]
        row += rows
        first = stored[run[0]]
        if isinstance(first, QuantParts):
            modules.append(QLinear(QuantParts.cat([stored[i] for i in run]), run_bias, dtype))
        elif isinstance(first, Int4Parts):
            modules.append(Int4Linear(Int4Parts.cat([stored[i] for i in run]), run_bias, dtype, device))
        else:
            weight = torch.cat([w.get(names[i]) for i in run], dim=0)
            dense = make_linear(weight, run_bias, "none", dtype, device)
            # beside qgemm linears (batch-invariant), keep the whole model batch-invariant
            modules.append(RowWise(dense, MAX_ROWS) if _serves_qgemm(w, quant, device) else dense)
    return modules[0] if len(modules) == 1 else ConcatLinear(modules)


def read_args(path: Path) -> ModelArgs:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    return ModelArgs.from_hf_config(json.loads(config_file.read_text()))


class SubsetHead(nn.Module):
    """An output head over a subset of the vocabulary (FR-Spec); every other token gets -inf.

    For a draft only: its distribution q is then zero outside the subset and renormalized
    inside it, which the acceptance rule takes like any other proposal (lossless). The
    subset is the first N token ids: a byte-level BPE vocabulary is numbered in merge order,
    so low ids are the frequent tokens; the tokenizer's added tokens (EOS, chat markers) are
    always kept.
    """

    def __init__(self, rows: nn.Module, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.rows = rows  # a linear over the kept rows of the head
        self.register_buffer("ids", ids)  # [n] int64, the vocabulary ids of those rows
        self.vocab_size = vocab_size
        self.out_features = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, dim] -> [T, vocab]
        kept = self.rows(x)  # [T, n]
        out = kept.new_full((x.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.ids, kept)

    def extra_repr(self) -> str:
        return f"{self.ids.numel()} of {self.vocab_size} tokens"


def subset_vocabulary(path: Path, vocab_size: int, n: int) -> torch.Tensor:
    """Token ids [0, n) plus the added tokens listed in the checkpoint's tokenizer.json, sorted."""
    if not 0 < n <= vocab_size:
        raise ValueError(f"head_vocab must be in 1..{vocab_size}, got {n}")
    added: set[int] = set()
    tokenizer_file = Path(path) / "tokenizer.json"
    if tokenizer_file.is_file():
        added = {int(t["id"]) for t in json.loads(tokenizer_file.read_text()).get("added_tokens", [])}
    ids = sorted(set(range(n)) | {i for i in added if i < vocab_size})
    return torch.tensor(ids, dtype=torch.int64)


@dataclass
class _Parts:
    """The modules of one checkpoint's decoder, built from its tensors `w` on one device and dtype."""

    w: object  # _Weights, GGUFFile or ShardedWeights: .get(name) -> tensor
    args: ModelArgs
    dtype: torch.dtype
    device: torch.device

    def linear(self, weights: list[str], biases: list[str] | None, quant: str) -> nn.Module:
        """One (fused) linear from HF tensors; biases=None means the architecture has none."""
        bias = None if biases is None else torch.cat([self.w.get(n) for n in biases], dim=0)
        return _linear(self.w, weights, bias, quant, self.dtype, self.device)

    def norm(self, name: str) -> nn.Parameter:
        return nn.Parameter(self.w.get(name).to(device=self.device, dtype=self.dtype), requires_grad=False)

    def fill_layer(self, i: int, layer: nn.Module, quant: str, row_parallel: bool) -> None:
        """Layer i's linears and norms; row_parallel: o_proj and down_proj all-reduce (tensor parallel)."""
        args = self.args
        wrap = AllReduced if row_parallel else (lambda linear: linear)
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."

        def names(prefix: str, parts: list[str], suffix: str, present: bool = True) -> list[str] | None:
            return [prefix + p + suffix for p in parts] if present else None

        qkv, gate_up = ["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]
        layer.attention.wqkv = self.linear(names(attn, qkv, ".weight"), names(attn, qkv, ".bias", args.qkv_bias), quant)
        layer.attention.wo = wrap(
            self.linear([attn + "o_proj.weight"], names(attn, ["o_proj"], ".bias", args.o_bias), quant)
        )
        layer.feed_forward.w13 = self.linear(
            names(mlp, gate_up, ".weight"), names(mlp, gate_up, ".bias", args.mlp_bias), quant
        )
        layer.feed_forward.w2 = wrap(
            self.linear([mlp + "down_proj.weight"], names(mlp, ["down_proj"], ".bias", args.mlp_bias), quant)
        )
        layer.attention_norm.weight = self.norm(f"model.layers.{i}.input_layernorm.weight")
        layer.ffn_norm.weight = self.norm(f"model.layers.{i}.post_attention_layernorm.weight")


def load_model(
    path: Path,
    dtype: torch.dtype = torch.bfloat16,
    quantization: str = "none",
    device: torch.device | str = "cpu",
    *,
    head_quantization: str | None = None,
    head_vocab: int = 0,
    split: TensorSplit | None = None,
) -> LlamaModel:
    """Build a LlamaModel from a resolved HF directory (config.json + *.safetensors).

    quantization: "none", "int8", "int4", "gguf" or "gguf-q4" for every decoder linear (see the module
    docstring). head_quantization: the same choice for the output head (vocab x dim, the
    biggest single matrix); None = `quantization` under "gguf" and "gguf-q4", else unquantized,
    whatever `quantization` is:
    measured on SmolLM2-135M, 1 thread, the oneDNN-packed bf16 head (1.7 ms) beats
    the int8 kernel (2.0 ms), and an int4 head (1.1 ms) drops the int4 draft's
    greedy agreement with the bf16 target from 0.98 to 0.86.
    With tied embeddings and no packing, the head shares the embedding tensor.
    head_vocab: 0 = logits over the whole vocabulary; N > 0 = a reduced head (FR-Spec, for a
    draft) over the first N token ids plus the tokenizer's added tokens (see SubsetHead).
    split: one tensor-parallel rank's share (tensor_split.py): its slices of every layer, its
    o_proj and down_proj wrapped in AllReduced (attach_all_reduce before the first forward).
    """
    check_choice("quantization", quantization, QUANTIZATIONS)
    path = Path(path)
    device = torch.device(device)
    args = read_args(path)
    w = open_weights(path)
    if quantization in GGUF_QUANTIZATIONS and not isinstance(w, GGUFFile):
        raise ValueError(f"quantization {quantization!r} serves a GGUF file's own weights, but {path} holds safetensors")
    if split is not None:
        w = ShardedWeights(w, split)
    parts = _Parts(w, args, dtype, device)
    with torch.device("meta"):
        model = LlamaModel(args, dtype=dtype, split=split)
    model.tok_embeddings.weight = parts.norm("model.embed_tokens.weight")
    for i, layer in enumerate(model.layers):
        parts.fill_layer(i, layer, quantization, row_parallel=split is not None)
    model.norm.weight = parts.norm("model.norm.weight")
    head_name = "model.embed_tokens.weight" if args.tie_embeddings or "lm_head.weight" not in w else "lm_head.weight"
    head_quant = head_quantization if head_quantization is not None else (quantization if quantization in GGUF_QUANTIZATIONS else "none")
    check_choice("head_quantization", head_quant, QUANTIZATIONS)
    if split is not None and split.rank != 0:
        model.output = None  # a follower rank computes no logits (LlamaModel.head with num_logits=0)
    elif head_vocab:
        ids = subset_vocabulary(path, args.vocab_size, head_vocab)
        if _serves_qgemm(w, head_quant, device) and w.is_quantized(head_name):  # the file's own blocks, those rows
            rows = QLinear(_as_served(w.quant(head_name).rows(ids), head_quant), None, dtype)
        else:
            rows = make_linear(w.get(head_name)[ids], None, "none" if head_quant in GGUF_QUANTIZATIONS else head_quant, dtype, device)
        model.output = SubsetHead(rows, ids.to(device), args.vocab_size)
    else:
        model.output = parts.linear([head_name], None, head_quant)
    if head_name == "model.embed_tokens.weight" and type(model.output) in (nn.Linear, Float32Linear):
        model.output.weight = model.tok_embeddings.weight  # tied and unpacked: share one tensor

    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"checkpoint {path} did not provide: {', '.join(missing)}")
    model.ensure_rope(min(args.max_position_embeddings, 4096))
    if split is None:  # a rank's row-parallel linears all-reduce: its group probes them (or not)
        model.linear_invariance()  # before any pass: it may make 1-row calls 2-row ones
    return model.eval()
