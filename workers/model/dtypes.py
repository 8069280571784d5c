"""A model's compute dtype: the config's `dtype`, with "auto" resolved for the device it runs on.

"auto" is bfloat16 where the hardware computes it natively and float32 where bfloat16 would be
emulated. Measured on an AVX2-only CPU (AMD EPYC, no AVX512; 1 thread, one 1536x576 weight):
a bf16 linear costs 1.7x a float32 one at 1 row and 4-8x at 8-32 rows, where a CPU with
AVX512-BF16 or AMX runs bf16 passes of up to 8 rows at about the cost of one. On CUDA, bf16
where the GPU supports it, else float16.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_computes_bf16() -> bool:
    """oneDNN has native bf16 kernels here (AVX512 or AMX on x86; bf16 instructions on ARM)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(name: str, device) -> torch.dtype:
    """The torch dtype a model configured with `dtype: name` computes in on `device`."""
    if name != AUTO:
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The config spelling of a torch dtype (torch.float32 -> "float32")."""
    return str(dtype).removeprefix("torch.")
