"""A GGUF file's tensors as the runtime needs them: 4-bit blocks as int4 parts, the rest as floats.

llama.cpp's 4-bit block formats map onto the asymmetric int4 group-32 layout of torch's packed
int4 kernel, w = (q - 8) * scale + zero with q in 0..15, exactly up to the rounding of scale and
zero to the kernel's dtype:

    Q4_0 (32 weights): w = d * (q - 8)              -> scale = d,      zero = 0
    Q4_1 (32 weights): w = d * q + m                -> scale = d,      zero = 8d + m
    Q4_K (256 = 8 x 32): w = d*sc_j * q - dmin*m_j  -> scale = d*sc_j, zero = 8 d*sc_j - dmin*m_j

so a model is served from the file's own 4-bit weights (the bytes per token llama.cpp reads).
Every other type (F32, F16, BF16, Q5_0, Q8_0, Q6_K, ...) is de-quantized exactly to float32 by
the `gguf` package; the loader decides what to make of it.

Tensor names are the Hugging Face ones (`model.layers.3.self_attn.q_proj.weight`); llama.cpp
stores q/k of the `llama` architecture with their rows permuted for its RoPE, which `get` undoes
(as transformers' GGUF loader does).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .linear import Int4Parts

# GGUF types whose blocks are int4 groups of 32 (see the module docstring).
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
GROUP = 32
# Types served as bytes by the qgemm kernel: w = s * (q - zero_point) per group:
# name -> (bytes per block, weights per block, group, zero point, where s comes from)
BYTE_TYPES = {
    "Q6_K": (210, 256, 16, 32.0),  # ql[128] qh[64] sc int8[16] d f16: s = d * sc
    "Q5_0": (22, 32, 32, 16.0),  # d f16, qh[4], qs[16]: s = d
    "Q8_0": (34, 32, 32, 128.0),  # d f16, qs int8[32]: s = d (q stored + 128)
}

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'blk.3.ffn_up.weight'."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _f16(raw: np.ndarray) -> np.ndarray:  # [n, 2] uint8 -> [n, 1] float32
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16*c] packed bytes -> [n, c, 32] uint8: per 16 bytes, the low nibbles then the high ones."""
    b = qs.reshape(qs.shape[0], -1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (b & np.uint8(0x0F)).reshape(qs.shape[0], -1, 32)


def _q4_k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes per block -> the 8 six-bit sub-block scales and mins: [n, 8] float32 each."""
    s = s.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), axis=1)
    mn = np.concatenate((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def q4_k_fields(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K blocks (144 bytes: d, dmin f16, 12 bytes of six-bit scales/mins, 128 bytes of nibbles)
    -> q [n, 8, 32] uint8, d [n, 1], dmin [n, 1] float32, sc [n, 8], m [n, 8] float32 (integers);
    sub-block j of 32 weights is d*sc[j]*q - dmin*m[j]."""
    blocks = raw.reshape(-1, 144)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _q4_k_scale_min(blocks[:, 4:16])
    # 4 chunks of 32 bytes: sub-block 2c in the low nibbles, 2c+1 in the high ones
    b = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (b & np.uint8(0x0F)).reshape(-1, 8, 32)
    return q, d, dmin, sc, mn


def int4_parts(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Int4Parts:
    """The int4 parts of a Q4_0/Q4_1/Q4_K tensor: raw [N, bytes per row] uint8, shape (N, K)."""
    N, K = shape
    if type_name == "Q4_K":
        q, d, dmin, sc, mn = q4_k_fields(raw)
        scales = d * sc
        zeros = 8 * scales - dmin * mn
    elif type_name in ("Q4_0", "Q4_1"):
        size = 18 if type_name == "Q4_0" else 20
        blocks = raw.reshape(-1, size)
        d = _f16(blocks[:, 0:2])  # [n, 1]
        q = _nibbles(blocks[:, size - 16 :])  # [n, 1, 32]
        scales = d
        zeros = np.zeros_like(d) if type_name == "Q4_0" else 8 * d + _f16(blocks[:, 2:4])
    else:
        raise ValueError(f"{type_name} is not a 4-bit block type (those are {', '.join(INT4_TYPES)})")
    return Int4Parts(
        torch.from_numpy(np.ascontiguousarray(q).reshape(N, K)).to(torch.int32),
        torch.from_numpy(np.ascontiguousarray(scales).reshape(N, K // GROUP)),
        torch.from_numpy(np.ascontiguousarray(zeros).reshape(N, K // GROUP)),
    )


def byte_scales(raw: np.ndarray, type_name: str, n_rows: int) -> torch.Tensor:
    """Per-group scales [N, K/group] float32 of a BYTE_TYPES tensor, from its block headers."""
    size = BYTE_TYPES[type_name][0]
    blocks = raw.reshape(-1, size)
    if type_name == "Q6_K":
        scales = _f16(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    else:
        scales = _f16(blocks[:, 0:2])  # [n, 1]
    return torch.from_numpy(np.ascontiguousarray(scales).reshape(n_rows, -1))


def byte_values(raw: np.ndarray, type_name: str) -> np.ndarray:
    """The unsigned quantized values [n_blocks, weights per block] uint8 of a BYTE_TYPES tensor
    (w = s * (q - zero_point)), unpacked from the block bits as llama.cpp lays them out."""
    size, per_block, _, _ = BYTE_TYPES[type_name]
    blocks = raw.reshape(-1, size)
    n = blocks.shape[0]
    if type_name == "Q8_0":
        return blocks[:, 2:34] ^ np.uint8(0x80)  # int8 + 128
    if type_name == "Q5_0":
        qh = np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32).reshape(n, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32).reshape(1, 32)) & np.uint32(1)).astype(np.uint8)
        low = (blocks[:, 6:22].reshape(n, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & np.uint8(0x0F)
        return low.reshape(n, 32) | (high << np.uint8(4))
    # Q6_K: 4 low bits in ql[128], 2 high bits in qh[64]
    low = (blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    return low.reshape(n, per_block) | (high.reshape(n, per_block) << np.uint8(4))


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (rows of head h: [pairs interleaved])."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, dim, 2).transpose(1, 2).reshape(n_rows)


class GGUFFile:
    """Tensors of a GGUF file by Hugging Face name (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self._reader = GGUFReader(str(self.path))
        self._tensors = {t.name: t for t in self._reader.tensors}
        arch_field = self._reader.fields.get("general.architecture")
        self.architecture = arch_field.contents() if arch_field is not None else "llama"
        self._heads = self._int_field(f"{self.architecture}.attention.head_count")
        self._kv_heads = self._int_field(f"{self.architecture}.attention.head_count_kv") or self._heads

    def _int_field(self, key: str) -> int | None:
        field = self._reader.fields.get(key)
        return None if field is None else int(field.contents())

    def __contains__(self, hf_name: str) -> bool:
        try:
            return gguf_name(hf_name) in self._tensors
        except KeyError:
            return False

    def _tensor(self, hf_name: str):
        name = gguf_name(hf_name)
        if name not in self._tensors:
            raise ValueError(f"GGUF file {self.path} has no tensor {name!r} ({hf_name})")
        return self._tensors[name]

    def type_name(self, hf_name: str) -> str:
        return self._tensor(hf_name).tensor_type.name

    def shape(self, hf_name: str) -> tuple[int, ...]:
        """Shape in torch order ([N, K] for a weight), i.e. GGUF's reversed."""
        return tuple(int(n) for n in reversed(self._tensor(hf_name).shape))

    def _row_order(self, hf_name: str) -> torch.Tensor | None:
        if self.architecture != "llama" or not self._heads:
            return None
        if ".q_proj." in hf_name:
            return _unpermute_rows(self.shape(hf_name)[0], self._heads)
        if ".k_proj." in hf_name:
            return _unpermute_rows(self.shape(hf_name)[0], self._kv_heads)
        return None

    def is_int4(self, hf_name: str) -> bool:
        return self.type_name(hf_name) in INT4_TYPES and len(self.shape(hf_name)) == 2

    def int4(self, hf_name: str) -> Int4Parts:
        """The tensor's own 4-bit weights (is_int4 must hold)."""
        t = self._tensor(hf_name)
        parts = int4_parts(np.asarray(t.data), t.tensor_type.name, self.shape(hf_name))
        order = self._row_order(hf_name)
        return parts if order is None else parts.rows(order)

    def is_quantized(self, hf_name: str) -> bool:
        """Whether the qgemm kernel can serve this tensor as stored (QuantParts)."""
        return (self.is_int4(hf_name) or self.type_name(hf_name) in BYTE_TYPES) and len(self.shape(hf_name)) == 2

    def quant(self, hf_name: str):
        """The tensor as QuantParts for the qgemm kernel: w = s * q + o per group, q unsigned.

        4-bit blocks as nibbles (o from the block: Q4_K's -dmin*m; Q4_0's and Q4_1's scales and
        offsets, float16 in the file, kept as float16 where they are exactly); Q6_K, Q5_0, Q8_0
        as bytes with their zero point, unpacked from the block bits."""
        from .qlinear import QuantParts

        if self.type_name(hf_name) == "Q4_K":
            return self._q4_k(hf_name)
        if self.is_int4(hf_name):
            p = self.int4(hf_name)
            offsets = p.zeros - 8 * p.scales
            half = all(torch.equal(t.half().float(), t) for t in (p.scales, offsets))
            return QuantParts(p.q.to(torch.uint8), p.scales, offsets, 0.0, GROUP, True, half=half)
        t = self._tensor(hf_name)
        _, _, group, zero_point = BYTE_TYPES[t.tensor_type.name]
        N, K = self.shape(hf_name)
        raw = np.asarray(t.data)
        scales = byte_scales(raw, t.tensor_type.name, N)  # [N, K/group]
        q = torch.from_numpy(np.ascontiguousarray(byte_values(raw, t.tensor_type.name)).reshape(N, K))
        q6k = None
        if t.tensor_type.name == "Q6_K":  # its own scales: int8 per 16, d per 256 (see qgemm.c)
            blocks = raw.reshape(-1, 210)
            sc = torch.from_numpy(np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).reshape(N, K // 16).copy())
            q6k = (sc, torch.from_numpy(np.ascontiguousarray(_f16(blocks[:, 208:210])).reshape(N, K // 256)))
        order = self._row_order(hf_name)
        if order is not None:
            scales, q = scales[order], q[order]
            q6k = None if q6k is None else (q6k[0][order], q6k[1][order])
        return QuantParts(q, scales, None, zero_point, group, False, None, q6k)

    def _q4_k(self, hf_name: str):
        """Q4_K as QuantParts with its own scale layout: s = d * sc, o = -dmin * m (exact)."""
        from .qlinear import QuantParts

        N, K = self.shape(hf_name)

        def rows(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:  # per-block fields -> [N, per row]
            return torch.from_numpy(np.ascontiguousarray(a).reshape(N, -1)).to(dtype)

        q, d, dmin, sc, mn = q4_k_fields(np.asarray(self._tensor(hf_name).data))
        q = rows(q, torch.uint8)
        sc_t, m_t = rows(sc, torch.uint8), rows(mn, torch.uint8)
        d_t, dmin_t = rows(d, torch.float32), rows(dmin, torch.float32)
        scales = d_t.repeat_interleave(8, dim=1) * sc_t.float()
        offsets = -dmin_t.repeat_interleave(8, dim=1) * m_t.float()
        order = self._row_order(hf_name)
        if order is not None:
            q, scales, offsets, sc_t, m_t, d_t, dmin_t = (x[order] for x in (q, scales, offsets, sc_t, m_t, d_t, dmin_t))
        return QuantParts(q, scales, offsets, 0.0, GROUP, True, (sc_t, m_t, d_t, dmin_t))

    def get(self, hf_name: str) -> torch.Tensor:
        """The tensor de-quantized to float32, in torch shape."""
        from gguf import dequantize

        t = self._tensor(hf_name)
        values = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a copy: the file is read-only
        values = values.reshape(self.shape(hf_name))
        order = self._row_order(hf_name)
        return values if order is None else values[order]
