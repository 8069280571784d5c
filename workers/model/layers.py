"""A pass's decoder layers in one kernel call (kernels/layers.c).

`LlamaModel.forward` and `forward_batch` on a CPU float32 model run their decode steps,
verifications and prefill chunks (those ending by FUSED_PREFILL_END) through `DecodeLayers` when
every layer is made of pieces our kernels compute (QLinear, a ConcatLinear of QLinears,
Float32Linear; RMSNorm, RoPE, attention and the SiLU gate by elementwise.c and attend.c). The
C loop calls those same kernels with the same arguments as the Python path, so a decode step's
or a verification's rows are bit for bit the same (a prefill chunk's attention is the row-wise
kernel's, not the masked pass's: the same up to rounding); what it removes is the Python, torch dispatch and ctypes work between them,
~0.4 ms a layer on the 2-core AVX2 machine (the real target's 1-token pass 57.9 -> 43.5 ms, its
draft's 23.9 -> 13.3: python -m bench.pass_cost, README "The real pair"). Everything else (a
later prefill chunk, bf16, a GPU, tensor parallelism, a layer of another kind) takes the Python
path.
"""

from __future__ import annotations

import ctypes

import torch

from .linear import ConcatLinear, Float32Linear, RowWise
from .qlinear import QLinear, _scratch, kernel, kernel_ready, qgemm_scratch_bytes

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
MAX_PARTS = 3  # a ConcatLinear's parts (q, k, v)


class Part(ctypes.Structure):  # kernels/layers.c's Part
    _fields_ = [("w", _p), ("scale", _p), ("offset", _p), ("super", _p), ("bias", _p), ("zero_point", _f),
                ("sgemm", _i), ("layout", _i), ("group", _i), ("tiles", _i), ("n", _i), ("col", _i)]


class Linear(ctypes.Structure):
    _fields_ = [("part", Part * MAX_PARTS), ("parts", _i), ("K", _i), ("width", _i), ("out", _i), ("bias", _p)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _p), ("ffn_norm", _p), ("wqkv", Linear), ("wo", Linear), ("w13", Linear), ("w2", Linear)]


class Shape(ctypes.Structure):
    _fields_ = [("dim", _i), ("heads", _i), ("kv_heads", _i), ("head_dim", _i), ("hidden", _i), ("eps", _f),
                ("scale", _f), ("max_width", _i)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _qgemm_part(q: QLinear, col: int) -> Part:
    w, layout, group, scale, offset, zero_point, super_, tiles = q.pointers()
    return Part(w=w, scale=scale, offset=offset, super=super_, zero_point=zero_point, layout=layout, group=group,
                tiles=tiles, col=col)


def linear_plan(module) -> Linear | None:
    """How layers.c computes `module` as the Python path does, or None where it cannot."""
    if type(module) is QLinear:
        if module.bias is not None and module.bias.dtype != torch.float32:
            return None
        return Linear(part=(Part * MAX_PARTS)(_qgemm_part(module, 0)), parts=1, K=module.in_features,
                      width=module.tiles * 16, out=module.out_features, bias=_ptr(module.bias))
    if type(module) is ConcatLinear and module.offsets is not None and len(module.parts) <= MAX_PARTS:
        parts = [_qgemm_part(p, col) for p, col in zip(module.parts, module.offsets)]
        return Linear(part=(Part * MAX_PARTS)(*parts), parts=len(parts), K=module.in_features,
                      width=module.offsets[-1] + module.parts[-1].tiles * 16, out=module.out_features,
                      bias=_ptr(module.qgemm_bias))
    if type(module) is RowWise and type(module.inner) is Float32Linear:  # sgemm: each row alone already
        return linear_plan(module.inner)
    if type(module) is Float32Linear:
        part = Part(w=module.weight.data_ptr(), bias=_ptr(module.bias), sgemm=1, n=module.out_features)
        return Linear(part=(Part * MAX_PARTS)(part), parts=1, K=module.in_features, width=module.out_features,
                      out=module.out_features)
    return None


class DecodeLayers:
    """The plan of a model's layers for layers.c: built once (`build`), run per pass (`run`)."""

    def __init__(self, layers: "ctypes.Array[Layer]", shape: Shape):
        self.layers, self.shape = layers, shape
        s = shape
        self.floats_per_row = max(s.dim, s.hidden) + s.max_width + (3 * s.heads + 3 * s.kv_heads) * s.head_dim
        self.qscratch_bytes = qgemm_scratch_bytes(max(s.dim, s.hidden, s.heads * s.head_dim))

    @classmethod
    def build(cls, model) -> "DecodeLayers | None":
        """The plan for `model` (a LlamaModel), or None where layers.c cannot run it."""
        from .model import Attention, FeedForward, TransformerBlock

        if model.device.type != "cpu" or model.dtype != torch.float32 or model.split is not None or not kernel_ready():
            return None
        first = model.layers[0]
        att, ff = first.attention, first.feed_forward
        H, KV, D = att.n_heads, att.n_kv_heads, att.head_dim
        dim, hidden = model.args.dim, ff.hidden
        if D % 16 or D > 256 or dim % 8 or hidden % 8:
            return None
        plans = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            if not (type(layer) is TransformerBlock and type(a) is Attention and type(f) is FeedForward):
                return None
            if (a.n_heads, a.n_kv_heads, a.head_dim, a.scale, f.hidden) != (H, KV, D, att.scale, ff.hidden):
                return None
            norms = (layer.attention_norm, layer.ffn_norm)
            if any(n.eps != first.attention_norm.eps or n.weight.dtype != torch.float32 for n in norms):
                return None
            linears = [linear_plan(m) for m in (a.wqkv, a.wo, f.w13, f.w2)]
            if any(lin is None for lin in linears):
                return None
            wqkv, wo, w13, w2 = linears
            if (wqkv.out, wo.K, wo.out, w13.out, w2.K, w2.out) != ((H + 2 * KV) * D, H * D, dim, 2 * hidden, hidden, dim):
                return None
            plans.append(Layer(attn_norm=layer.attention_norm.weight.data_ptr(), ffn_norm=layer.ffn_norm.weight.data_ptr(),
                               wqkv=wqkv, wo=wo, w13=w13, w2=w2))
        shape = Shape(dim=dim, heads=H, kv_heads=KV, head_dim=D, hidden=hidden, eps=first.attention_norm.eps,
                      scale=att.scale, max_width=max(lin.width for p in plans for lin in (p.wqkv, p.wo, p.w13, p.w2)))
        return cls((Layer * len(plans))(*plans), shape)

    @staticmethod
    def takes(cache) -> bool:
        """Whether passes over `cache` (a KVCache) can run here: float32 [L, KV, S, D] on the CPU."""
        k, v = cache.k, cache.v
        return k.dtype == v.dtype == torch.float32 and k.is_cpu and k.is_contiguous() and v.is_contiguous()

    def run(self, h: torch.Tensor, caches: list, starts: list[int], lengths: list[int], cos: torch.Tensor,
            sin: torch.Tensor) -> None:
        """One pass over segments (sequences): lengths[j] new rows at positions starts[j]..
        over caches[j] (KVCaches that `takes`), their rows one after another in h [N, dim] float32
        contiguous, which is updated in place through every layer. cos, sin: the model's RoPE
        tables [P, 1, D] float32, P > starts[j] + lengths[j]. Writes the new keys and values (the
        caller advances each cache's length)."""
        if h.dtype != torch.float32 or not h.is_contiguous():
            raise ValueError(f"decode_layers takes contiguous float32 rows, not {h.dtype} of strides {h.stride()}")
        n, N, s = len(caches), h.shape[0], self.shape
        ints, longs = ctypes.c_int * n, ctypes.c_int64 * n
        floats = N * self.floats_per_row
        base = _scratch(floats * 4 + 64 + self.qscratch_bytes)
        scratch = (base + 63) // 64 * 64
        rc = kernel().decode_layers(
            self.layers, len(self.layers), ctypes.byref(s), h.data_ptr(), n, ints(*lengths), ints(*starts),
            longs(*(c.k.data_ptr() for c in caches)), longs(*(c.v.data_ptr() for c in caches)),
            longs(*(c.k.stride(0) for c in caches)), longs(*(c.k.stride(1) for c in caches)),
            cos.data_ptr(), sin.data_ptr(), scratch, scratch + floats * 4, torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"decode_layers refused a pass of segments of {lengths} rows at {starts}")
