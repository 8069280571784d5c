"""The elementwise pieces of a layer: RMSNorm, RoPE and the MLP's SiLU gate.

Float32 rows on a CPU take our C kernel (kernels/elementwise.c, built into qgemm's library);
everything else (bf16, GPUs, TANDEM_QGEMM=0, no compiler) takes torch's ops. On a decode step
torch dispatches each of these as several small ops, 20-35 us each piece on the 2-core AVX2
machine (RMSNorm alone is ten ops), against ~5 us for a kernel call: ~150 us a layer, 4 ms of
a 30-layer pass. The kernel computes every row on its own in one fixed order, so a row is
bit for bit the same alone or batched (batch invariance); it is the only path for float32 CPU
rows, so a token's keys are the same whether a prefill, a verification or a decode step
wrote them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .qlinear import kernel, kernel_ready


def native(x: torch.Tensor) -> bool:
    """Whether x's rows take the C kernel: float32 on a CPU that runs it."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and kernel_ready()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * weight / sqrt(mean(x^2) + eps) over the last dim: x [..., K] -> [..., K]."""
    K = x.shape[-1]
    if not (native(x) and weight.dtype == torch.float32 and K % 8 == 0):
        return F.rms_norm(x, weight.shape, weight, eps)
    rows = x.reshape(-1, K)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.float32)
    rc = kernel().rms_norm(rows.data_ptr(), rows.shape[0], K, rows.stride(0), weight.data_ptr(), eps, out.data_ptr(), K,
                           torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"rms_norm refused rows {tuple(rows.shape)}")
    return out.view(x.shape)


def rope(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first `heads` heads of each row: x [T, >= heads * D] (the columns of a wider
    projection may follow), cos, sin [T, 1, D] (sin with its first half negated, see
    model.rope_tables) -> [T, heads, D], x * cos + swap_halves(x) * sin (= rotate_half form)."""
    T = x.shape[0]
    if not (native(x) and head_dim % 16 == 0 and x.stride(1) == 1 and cos.dtype == torch.float32):
        xh = x[:, : heads * head_dim].view(T, heads, head_dim)
        half = head_dim // 2
        swapped = torch.cat((xh[..., half:], xh[..., :half]), dim=-1)  # [T, heads, D]
        return torch.addcmul(xh * cos, swapped, sin)
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(T, heads, head_dim, dtype=torch.float32)
    rc = kernel().rope_rows(x.data_ptr(), T, x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), head_dim,
                            out.data_ptr())
    if rc != 0:
        raise RuntimeError(f"rope_rows refused T={T}, heads={heads}, D={head_dim}")
    return out


def silu_mul(gate_up: torch.Tensor, hidden: int) -> torch.Tensor:
    """The MLP's gate: gate_up [M, 2 * hidden] (gate, then up) -> silu(gate) * up, [M, hidden]."""
    gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
    if not (native(gate_up) and hidden % 8 == 0 and gate_up.stride(1) == 1):
        return F.silu(gate) * up
    out = torch.empty(gate_up.shape[0], hidden, dtype=torch.float32)
    rc = kernel().silu_mul(gate_up.data_ptr(), gate_up.shape[0], hidden, gate_up.stride(0), out.data_ptr(), hidden,
                           torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"silu_mul refused {tuple(gate_up.shape)}")
    return out
