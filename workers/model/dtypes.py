"""A model's compute dtype: the config's `dtype`, with "auto" resolved for the device it runs on.

"auto" is bfloat16 where the hardware computes it natively and float32 where bfloat16 would be
emulated. Measured on an AVX2-only CPU (AMD EPYC, no AVX512; 1 thread, one 1536x576 weight):
a bf16 linear costs 1.7x a float32 one at 1 row and 4-8x at 8-32 rows, where a CPU with
AVX512-BF16 or AMX runs bf16 passes of up to 8 rows at about the cost of one. On CUDA, bf16
where the GPU supports it, else float16.

A CPU model served from its GGUF blocks (GGUF_QUANTIZATIONS: Tandem's qgemm kernel, which takes
float32 rows and quantizes them to int8 itself) is float32 under "auto" on every CPU: only
float32 rows run its layers in one C call (workers/model/layers.py), and bf16 there only adds
conversions around every kernel. Measured on an AVX512-VNNI/BF16 CPU (AMD Zen5, 2 threads,
python -m bench.pass_cost, 200 positions): the default 4-bit draft's 1-token pass 4.9 ms in
float32 against 9.6 in bf16, 16 tokens 15.9 against 21.6; the Qwen 1.5B target's 1-token pass
33.7 against 42.9, the 0.5B draft's 10.3 against 13.6. A dense target there stays bf16: 1
token 19.0 ms against 18.1 in float32, 48 tokens 51.9 against 87.0 (oneDNN's bf16 kernels).
"""

from __future__ import annotations

import torch

from configs.choices import GGUF_QUANTIZATIONS

AUTO = "auto"


def cpu_computes_bf16() -> bool:
    """oneDNN has native bf16 kernels here (AVX512 or AMX on x86; bf16 instructions on ARM)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(name: str, device, quantization: str) -> torch.dtype:
    """The torch dtype a model configured with `dtype: name` and `quantization` computes in on `device`."""
    if name != AUTO:
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if quantization in GGUF_QUANTIZATIONS:
        return torch.float32
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """The config spelling of a torch dtype (torch.float32 -> "float32")."""
    return str(dtype).removeprefix("torch.")
