"""The linear layers of the runtime: dense (float32 by our kernel, bf16 prepacked by oneDNN, on CPU) and weight-only quantized.

Measured on this CPU (AMD EPYC, avx512_bf16, no AMX; 1 thread, bf16, one 3072x576 weight,
1 input row, weights cold in cache):
- plain F.linear: 0.25 ms (~15 GB/s). oneDNN prepacked (`mkldnn._reorder_linear_weight` +
  `mkldnn._linear_pointwise`, what inductor's freezing uses): 0.12 ms (~28 GB/s), bit-identical.
  So every dense bf16 CPU linear is prepacked. A fixed ~12 us per bf16 call remains.
- float32 goes through our own kernel instead (Float32Linear, kernels/sgemm.c): on an AVX2-only
  AMD Zen3 (2 threads, 576x3072, `python -m bench.sgemm_cost`) torch's prepacked call takes
  0.27 ms at 1 row but 0.49 at 2 and 0.84 at 16, and its 1-row call takes another kernel than
  its 2+-row calls (not batch-invariant); ours takes 0.27, 0.27 and 0.61, the same sums for
  any row count.
- int8 weight-only `torch._weight_int8pack_mm`: 0.12 ms at 1 row (compute-bound, ~15 GB/s of
  int8), so an int8 model is barely cheaper than the packed bf16 one at 1 token; its cost grows
  linearly with rows (0.2 ms at 8, 5 ms at 200), so passes of more than INT8_KERNEL_MAX_ROWS rows
  dequantize on the fly instead.
- int4 `torch._weight_int4pack_mm_for_cpu`: ~0.05-0.06 ms at 1 row, also linear in rows.
- fbgemm dynamic int8 (`quantized.linear_dynamic`, int8 activations too): 0.075 ms, but
  activation quantization is fragile with outlier channels: greedy agreement of a SmolLM2 draft
  with the bf16 target fell from 0.96 (weight-only) to 0.84. Not used.

int8: symmetric per-output-channel, w ~= q[N, K] * scale[N].
int4: asymmetric grouped (gpt-fast layout), w ~= (q - 8) * scale + zero per group of
      `group_size` (32) input columns; the packed layout is opaque, so every row count goes
      through the kernel (a 200-row prefill costs ~2.6x a dense one).
Elsewhere (CUDA, or dtypes without a fast kernel: float32) quantized linears dequantize on the fly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from configs.choices import QUANTIZATIONS, check_choice  # one definition, shared with the config loader

from .dtypes import cpu_computes_bf16
from .qlinear import QLinear, kernel, kernel_available, min_max_4bit

# Row count up to which the int8 kernel beats dequantize-then-matmul (measured on CPU, bf16).
INT8_KERNEL_MAX_ROWS = 12


def _has_op(namespace, name: str) -> bool:
    try:
        getattr(namespace, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def mkldnn_packing_ok(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not (_has_op(torch.ops.mkldnn, "_reorder_linear_weight") and _has_op(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return cpu_computes_bf16()
    return False


def int4_available() -> bool:
    return _has_op(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and _has_op(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def _param(t: torch.Tensor | None, device, dtype) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)


class PackedLinear(nn.Module):
    """Dense linear with the weight prepacked for oneDNN (CPU, float32/bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.to(dtype=dtype).contiguous()
        self.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(w, 1), requires_grad=False)  # opaque
        self.bias = _param(bias, "cpu", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, onednn-packed"


class Float32Linear(nn.Module):
    """Dense float32 linear on CPU through our kernel (kernels/sgemm.c): it reads the weights near
    memory bandwidth for small passes, and computes every row on its own in one fixed order, so
    a row is bit for bit the same alone or batched with others (batch-invariant from 1 row).
    Measured in the module docstring above. The weight stays a plain [N, K] tensor (a tied
    head shares the embedding's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _param(weight.contiguous(), "cpu", torch.float32)
        self.bias = _param(bias, "cpu", torch.float32)
        self._sgemm = kernel().sgemm

    @staticmethod
    def serves(weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this linear can take `weight` [N, K] (else make_linear uses torch's)."""
        return device.type == "cpu" and dtype == torch.float32 and weight.shape[1] % 8 == 0 and kernel_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] float32 -> [..., N]
        if x.dtype != torch.float32:
            raise TypeError(f"Float32Linear takes float32 rows, not {x.dtype}")
        rows = x.reshape(-1, self.in_features).contiguous()
        y = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        rc = self._sgemm(
            rows.data_ptr(), rows.shape[0], self.in_features, self.weight.data_ptr(), self.out_features,
            None if self.bias is None else self.bias.data_ptr(), y.data_ptr(), self.out_features, torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"sgemm refused x {tuple(x.shape)} for a {self.out_features}x{self.in_features} weight")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, float32 sgemm"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (q int8 [N, K], scale float32 [N]), symmetric per row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [N]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """Weight-only int8: y = (x @ q.T) * scale + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        device = torch.device(device)
        q, scale = quantize_int8(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q.to(device))  # [N, K] int8
        self.register_buffer("scales", scale.to(device=device, dtype=dtype))  # [N]
        self.bias = _param(bias, device, dtype)
        self.use_kernel = device.type == "cpu" and dtype == torch.bfloat16 and _has_op(torch.ops.aten, "_weight_int8pack_mm")

    def dequantized(self) -> torch.Tensor:  # [N, K] in the compute dtype
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        if self.use_kernel and x.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel, kernel={self.use_kernel}"


@dataclass(frozen=True)
class Int4Parts:
    """An int4 weight before packing: w ~= (q - 8) * scale + zero per group of `group` input columns."""

    q: torch.Tensor  # [N, K] int32 in 0..15
    scales: torch.Tensor  # [N, K/group] float32
    zeros: torch.Tensor  # [N, K/group] float32

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        N, K = self.q.shape
        q = self.q.view(N, K // self.group, self.group).float()
        return ((q - 8) * self.scales[..., None] + self.zeros[..., None]).view(N, K)

    def rows(self, index: torch.Tensor) -> "Int4Parts":
        return Int4Parts(self.q[index], self.scales[index], self.zeros[index])

    def columns(self, lo: int, hi: int) -> "Int4Parts":
        """Input features [lo, hi) only (a row-parallel shard), cut on group boundaries."""
        g = self.group
        if lo % g or hi % g:
            raise ValueError(f"an int4 weight is cut on its groups of {g} inputs, not at [{lo}, {hi})")
        return Int4Parts(*(t[:, lo // per : hi // per].contiguous() for t, per in ((self.q, 1), (self.scales, g), (self.zeros, g))))

    @staticmethod
    def cat(parts: list["Int4Parts"]) -> "Int4Parts":
        """Stack along the output dimension (a fused linear); all parts must share their group size."""
        return Int4Parts(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "zeros")))


def quantize_int4(w: torch.Tensor, group_size: int) -> Int4Parts:
    """w: [N, K] -> the asymmetric int4 parts (min/max per group, min_max_4bit) of torch's int4pack layout."""
    q, scales, low = min_max_4bit(w, group_size)
    return Int4Parts(q, scales, low + scales * 8)


def int4_group_size(in_features: int, preferred: int = 32) -> int:
    for g in (preferred, 128, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    raise ValueError(f"int4 quantization needs in_features divisible by 32, got {in_features}")


class Int4Linear(nn.Module):
    """Weight-only int4, grouped along the input dimension, from Int4Parts."""

    def __init__(self, parts: Int4Parts, bias: torch.Tensor | None, dtype: torch.dtype, device):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = parts.q.shape
        self.group_size = parts.group
        self.dtype = dtype
        # On CPU the bf16 kernel serves float32 models too (inputs cast to bf16): its float32
        # variant is a reference loop (~57x slower, measured), the dequantizing fallback ~100x.
        # The kernel computes each row on its own: a row's result does not depend on the others
        # in the batch (checked bit for bit at 1..16 rows), so verification passes match ar's.
        self.use_kernel = device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and int4_available()
        self.kernel_dtype = torch.bfloat16 if self.use_kernel else dtype
        # The CPU packing takes N in multiples of 16 only (a GGUF head over 32001 tokens is not):
        # zero rows (q = 8, scale = zero = 0) pad it, and their outputs are cut off in forward.
        self.pad_rows = (-self.out_features) % 16 if self.use_kernel else 0
        if self.pad_rows:
            K, G = self.in_features, parts.scales.shape[1]
            parts = Int4Parts(
                torch.cat([parts.q, parts.q.new_full((self.pad_rows, K), 8)]),
                torch.cat([parts.scales, parts.scales.new_zeros(self.pad_rows, G)]),
                torch.cat([parts.zeros, parts.zeros.new_zeros(self.pad_rows, G)]),
            )
        sz = torch.stack([parts.scales, parts.zeros], dim=2).transpose(0, 1).contiguous()  # [K/g, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=self.kernel_dtype))
        if self.use_kernel:
            self.register_buffer("weight", torch._convert_weight_to_int4pack_for_cpu(parts.q, 2))  # opaque
        else:
            self.register_buffer("weight", parts.q.to(device=device, dtype=torch.uint8))  # [N, K] values 0..15
        self.bias = _param(bias, device, dtype)

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype, device, group_size=32) -> "Int4Linear":
        return cls(quantize_int4(weight, int4_group_size(weight.shape[1], group_size)), bias, dtype, device)

    def dequantized(self) -> torch.Tensor:  # [N, K] in the compute dtype
        if self.use_kernel:  # the packed layout is opaque: unpack through the kernel
            eye = torch.eye(self.in_features, dtype=self.kernel_dtype, device=self.weight.device)
            w = torch._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, self.scales_and_zeros).t()
            return w[: self.out_features].to(self.dtype)
        sz = self.scales_and_zeros.transpose(0, 1)  # [N, K/g, 2]
        scales = sz[..., 0].repeat_interleave(self.group_size, dim=1)
        zeros = sz[..., 1].repeat_interleave(self.group_size, dim=1)
        return (self.weight.to(self.dtype) - 8) * scales + zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        if self.use_kernel:
            out = torch._weight_int4pack_mm_for_cpu(
                x.to(self.kernel_dtype), self.weight, self.group_size, self.scales_and_zeros
            )
            if self.pad_rows:
                out = out[:, : self.out_features].contiguous()
            out = out.to(x.dtype)
        else:
            out = F.linear(x, self.dequantized())
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int4 group={self.group_size}, kernel={self.use_kernel}"


class RowWise(nn.Module):
    """A dense linear made batch-invariant for small passes: up to `max_rows` rows are computed
    one at a time (a GEMM's reduction order may depend on how many rows it is given), so a
    verification pass gives bit for bit what decode steps give. For the rare dense 2-D tensor
    of a GGUF model served by qgemm, whose other linears are invariant already."""

    def __init__(self, inner: nn.Module, max_rows: int):
        super().__init__()
        self.inner, self.max_rows = inner, max_rows
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        if 1 < x.shape[0] <= self.max_rows:
            return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])])
        return self.inner(x)


class ConcatLinear(nn.Module):
    """Linears side by side along the output: a fused projection whose parts are stored differently
    (e.g. a GGUF layer whose q/k are 4-bit and whose v is 6-bit)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

        # qgemm parts write side by side into one output (no per-part conversion, no cat): all
        # but the last must fill whole tiles of 16 columns (the last may pad past the end)
        qgemm = all(isinstance(p, QLinear) for p in parts) and all(p.out_features % 16 == 0 for p in parts[:-1])
        self.offsets = [sum(p.out_features for p in parts[:i]) for i in range(len(parts))] if qgemm else None
        biases = [p.bias for p in parts]
        self.register_buffer("qgemm_bias", torch.cat(biases) if qgemm and biases[0] is not None else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, sum N]
        if self.offsets is None:
            return torch.cat([p(x) for p in self.parts], dim=-1)
        rows = x.float().contiguous()
        last = self.parts[-1]
        out = torch.empty(rows.shape[0], self.offsets[-1] + last.tiles * 16, dtype=torch.float32)
        threads = torch.get_num_threads()
        for part, col in zip(self.parts, self.offsets):
            part.into(rows, out[:, col:], threads)
        y = out[:, : self.out_features].to(x.dtype)
        return y if self.qgemm_bias is None else y + self.qgemm_bias


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantization: str, dtype, device) -> nn.Module:
    """A linear layer for weight [N, K] (float, any dtype), inputs [M, K], in the requested quantization."""
    device = torch.device(device)
    if quantization == "int8":
        return Int8Linear(weight, bias, dtype, device)
    if quantization == "int4":
        if device.type == "cpu" and not int4_available():
            raise ValueError("int4 quantization is not available on this torch build (no _weight_int4pack_mm_for_cpu)")
        return Int4Linear.quantize(weight, bias, dtype, device)
    if quantization != "none":
        check_choice("quantization", quantization, QUANTIZATIONS)
    if Float32Linear.serves(weight, dtype, device):
        return Float32Linear(weight, bias)
    if mkldnn_packing_ok(device, dtype):
        try:
            return PackedLinear(weight, bias, dtype)
        except RuntimeError as e:  # an unusual build: fall back to the plain matmul
            warnings.warn(f"oneDNN weight prepacking failed, using plain linear: {e}")
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = _param(weight, device, dtype)
    if bias is not None:
        lin.bias = _param(bias, device, dtype)
    return lin
