"""Linears over GGUF-style quantized weights, computed by our kernel (kernels/qgemm.c; AVX512-VNNI or AVX2).

Every weight group of G input columns is `w = s * q + o` with q unsigned: 4-bit blocks
(Q4_0, Q4_1, Q4_K) as nibbles in groups of 32 (Q4_0's and Q4_1's s and o, and those of a
draft's weights re-quantized to 4 bits, read as float16); Q6_K (groups of 16), Q5_0 and Q8_0
(groups of 32) as bytes. Why a kernel of our own: torch's packed int4 kernel dequantizes its weights
for every 4 input rows, so verifying 3 drafts costs ~1.6x a decode step and 4 drafts ~2x,
and it has no home for Q6_K (the target's head and half its down projections would be
bf16, 2 bytes a weight). Ours reads the weights once per pass for up to 8 rows, with int8
activations (per 32-block scales, as llama.cpp does) and vpdpbusd (AVX2: vpmaddubsw and
vpmaddwd, with the same exact integer sums), so a verification costs about a decode step, and
Q6_K is served at 0.83 bytes a weight.

The kernel is C, compiled once with the system's gcc into the cache directory (one library
with kernels/attend.c, the attention of short passes: attend.py; kernels/sgemm.c, the float32
linears: linear.Float32Linear; kernels/elementwise.c, RMSNorm, RoPE and the SiLU gate:
elementwise.py; kernels/layers.c, a short pass's decoder layers in one call: layers.py) and
loaded with ctypes; it shares torch's OpenMP runtime (libgomp is loaded by torch first) and uses
torch's thread count. It is built for the best of VARIANTS that the CPU runs (AVX512-VNNI, else
AVX2 + FMA + F16C), each its own library in the cache. Where it cannot run (no gcc, neither variant's
CPU flags, not a CPU tensor), `kernel()` says why and the loader falls back to torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

SOURCES = [  # one library
    Path(__file__).with_name("kernels") / name for name in ("qgemm.c", "attend.c", "sgemm.c", "elementwise.c", "layers.c")
]
HEADERS = [Path(__file__).with_name("kernels") / "avx2.h"]  # included by the sources: part of the build's hash
# The kernel's builds, best first: name -> (CPU flags it needs, as /proc/cpuinfo names them; gcc flags).
# The C sources pick their code by the compiler's macros (__AVX512VNNI__, else __AVX2__).
VARIANTS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # every variant's
MAX_ROWS = 8  # rows per kernel call (a pass of more rows is computed in chunks)
# qgemm.c's weight layouts by number (QuantParts.layout), in words
LAYOUTS = ("8-bit", "4-bit", "6-bit", "4-bit, half scales")


class KernelUnavailable(RuntimeError):
    pass


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")


def machine_variants() -> list[str]:
    """The VARIANTS this CPU runs, best first."""
    flags = cpu_flags()
    return [name for name, (needs, _) in VARIANTS.items() if all(f in flags for f in needs)]


def _setting() -> str:
    """TANDEM_QGEMM: "0" (torch's kernels), a variant's name (that one), else the best the CPU runs."""
    return os.environ.get("TANDEM_QGEMM", "1")


def machine_can_build(variant: str | None = None) -> str | None:
    """Why this machine cannot run the kernel (the variant named, else TANDEM_QGEMM's, else its
    best); None: it can: the CPU flags and a compiler are there."""
    if _setting() == "0":
        return "disabled by TANDEM_QGEMM=0"
    variant = variant or (_setting() if _setting() in VARIANTS else None)
    flags = cpu_flags()
    if variant is None and not machine_variants():
        lacks = "; ".join(f"{name}: {', '.join(f for f in needs if f not in flags)}" for name, (needs, _) in VARIANTS.items())
        return f"this CPU lacks the flags of every variant of the kernel ({lacks})"
    if variant is not None:
        missing = [f for f in VARIANTS[variant][0] if f not in flags]
        if missing:
            return f"this CPU lacks {', '.join(missing)} (the kernel's {variant} variant)"
    if _compiler() is None:
        return "no C compiler (gcc) to build it"
    return None


@lru_cache(maxsize=None)
def kernel(variant: str | None = None) -> ctypes.CDLL:
    """The compiled kernel (the variant named, else TANDEM_QGEMM's, else the CPU's best; built
    once per source version and variant into the cache), or KernelUnavailable."""
    from .embedded import cache_root

    reason = machine_can_build(variant)
    if reason is not None:
        raise KernelUnavailable(reason)
    variant = variant or (_setting() if _setting() in VARIANTS else machine_variants()[0])
    compiler = _compiler()
    cflags = CFLAGS + VARIANTS[variant][1]
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    digest = hashlib.sha256(source + " ".join(cflags).encode()).hexdigest()[:16]
    lib = cache_root() / "kernels" / f"qgemm-{variant}-{digest}.so"
    if not lib.is_file():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        result = subprocess.run([compiler, *cflags, "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True)
        if result.returncode != 0:
            os.unlink(tmp)
            raise KernelUnavailable(f"building {', '.join(p.name for p in SOURCES)} failed: {result.stderr.strip()[:500]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    p, i, f, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    signatures = {  # every entry point's arguments; each returns an int (0, or -1 for arguments it refuses)
        "qgemm": [p, i, i, p, i, i, p, p, f, p, i, p, i, p, i],
        "attend_rows": [p, i, i, i, i, p, p, i, n, i, f, p, p, n, p, n, i],
        "attend_segments": [p, p, p, i, p, p, p, p, p, i, i, i, i, f, p, i],
        "sgemm": [p, i, i, p, i, p, p, i, i],
        "rms_norm": [p, i, i, n, p, f, p, n, i],
        "rope_rows": [p, i, n, i, i, p, p, n, p],
        "silu_mul": [p, i, i, n, p, n, i],
        "decode_layers": [p, i, p, p, i, p, p, p, p, p, p, p, p, p, p, i],
    }
    for name, argtypes in signatures.items():
        entry = getattr(dll, name)
        entry.argtypes, entry.restype = argtypes, i
    return dll


def kernel_available() -> bool:
    try:
        kernel()
        return True
    except KernelUnavailable:
        return False


def min_max_4bit(w: torch.Tensor, group: int, half: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of w [N, K]: per group of `group` inputs, scale = (max - min) / 15
    (the range at least 1e-6), q = round((w - min) / scale) in 0..15, so w ~= q * scale + min.
    half: min rounded down and scale up to float16 values, so q stays in 0..15 and within half a
    step. Returns q [N, K] int32, scales and mins [N, K/group] float32."""
    N, K = w.shape
    groups = w.float().reshape(N * K // group, group)
    low = groups.amin(dim=1, keepdim=True)
    if half:
        low = _to_half(low, down=True)
    scales = (groups.amax(dim=1, keepdim=True) - low).clamp(min=1e-6) / 15
    if half:
        scales = _to_half(scales, down=False)
    q = ((groups - low) / scales).round().clamp_(0, 15).to(torch.int32).reshape(N, K)
    return q, scales.reshape(N, -1), low.reshape(N, -1)


def _to_half(t: torch.Tensor, down: bool) -> torch.Tensor:
    """t (float32) rounded down (or up) to float16 values, as float32."""
    h = t.half()
    if not torch.isfinite(h).all():
        raise ValueError("weights beyond float16's range cannot take half scales")
    past = h.float() > t if down else h.float() < t
    h = torch.where(past, torch.nextafter(h, torch.full_like(h, -torch.inf if down else torch.inf)), h)
    return h.float()


@lru_cache(maxsize=1)
def kernel_ready() -> bool:
    """kernel_available(), asked once per process: the check on a pass's path (where the kernel
    cannot run, kernel_available re-reads /proc/cpuinfo at every call)."""
    return kernel_available()


@dataclass(frozen=True)
class QuantParts:
    """A quantized weight before packing: w[n, k] = scales[n, g] * q[n, k] + offsets[n, g], g = k // group.

    offsets None means offsets = -zero_point * scales (Q6_K, Q5_0, Q8_0: one zero point, and
    q < 2 * zero_point, which the AVX2 kernel relies on for bytes).
    q4k: Q4_K's own scale layout (sc, m uint8 [N, K/32]; d, dmin float32 [N, K/256]) from which
    scales = d * sc and offsets = -dmin * m; the kernel reads it instead (0.09 bytes a weight).
    q6k: Q6_K's own scale layout (sc int8 [N, K/16], d float32 [N, K/256]; scales = d * sc,
    zero point 32), with q packed in six bits.
    """

    q: torch.Tensor  # [N, K] uint8 (< 16 when nibbles)
    scales: torch.Tensor  # [N, K/group] float32
    offsets: torch.Tensor | None  # [N, K/group] float32, or None
    zero_point: float
    group: int
    nibbles: bool
    q4k: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # sc, m, d, dmin
    q6k: tuple[torch.Tensor, torch.Tensor] | None = None  # sc int8 [N, K/16], d float32 [N, K/256]
    # nibbles whose scales and offsets are float16 values (held here as float32): the kernel
    # reads them as float16, 0.125 bytes a weight instead of 0.25
    half: bool = False

    @property
    def layout(self) -> int:
        """The kernel's weight layout: 0 bytes, 1 nibbles, 2 six bits (Q6_K, 0.75 bytes a weight),
        3 nibbles with float16 scales and offsets."""
        return (3 if self.half else 1) if self.nibbles else 2 if self.q6k is not None else 0

    @staticmethod
    def quantize_4bit(w: torch.Tensor, group: int = 32) -> "QuantParts":
        """w [N, K] as nibbles in groups of `group` with float16 scales and mins (Q4_1's form as
        GGUF stores it, min_max_4bit): w ~= q * scale + min, 5 bits a weight."""
        q, scales, low = min_max_4bit(w, group, half=True)
        return QuantParts(q.to(torch.uint8), scales, low, 0.0, group, True, half=True)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        N, K = self.q.shape
        q = self.q.view(N, K // self.group, self.group).float()
        offsets = self.offsets if self.offsets is not None else -self.zero_point * self.scales
        return (q * self.scales[..., None] + offsets[..., None]).view(N, K)

    def kind(self) -> tuple:
        """Parts of one kind can be stacked into one packed weight."""
        return (self.group, self.layout, self.offsets is None, self.zero_point, self.q4k is not None)

    def rows(self, index: torch.Tensor) -> "QuantParts":
        """These output features only (a column-parallel shard)."""
        pick = None if self.offsets is None else self.offsets[index]
        q4k = None if self.q4k is None else tuple(t[index] for t in self.q4k)
        q6k = None if self.q6k is None else tuple(t[index] for t in self.q6k)
        return QuantParts(self.q[index], self.scales[index], pick, self.zero_point, self.group, self.nibbles, q4k, q6k,
                          self.half)

    def columns(self, lo: int, hi: int) -> "QuantParts":
        """Input features [lo, hi) only (a row-parallel shard), cut on block boundaries."""
        block = 256 if self.q4k is not None or self.q6k is not None else self.group
        if lo % block or hi % block:
            raise ValueError(f"a quantized weight is cut on its blocks of {block} inputs, not at [{lo}, {hi})")

        def cut(t: torch.Tensor, per: int) -> torch.Tensor:  # t: [N, K / per]
            return t[:, lo // per : hi // per].contiguous()

        offsets = None if self.offsets is None else cut(self.offsets, self.group)
        q4k = None if self.q4k is None else (cut(self.q4k[0], 32), cut(self.q4k[1], 32), cut(self.q4k[2], 256), cut(self.q4k[3], 256))
        q6k = None if self.q6k is None else (cut(self.q6k[0], 16), cut(self.q6k[1], 256))
        return QuantParts(cut(self.q, 1), cut(self.scales, self.group), offsets, self.zero_point, self.group, self.nibbles, q4k, q6k,
                          self.half)

    @staticmethod
    def cat(parts: list["QuantParts"]) -> "QuantParts":
        first = parts[0]
        offsets = None if first.offsets is None else torch.cat([p.offsets for p in parts])
        q4k = None if first.q4k is None else tuple(torch.cat([p.q4k[i] for p in parts]) for i in range(4))
        q6k = None if first.q6k is None else tuple(torch.cat([p.q6k[i] for p in parts]) for i in range(2))
        return QuantParts(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), offsets,
                          first.zero_point, first.group, first.nibbles, q4k, q6k, first.half)


def _tiles(t: torch.Tensor, n_pad: int) -> torch.Tensor:
    """[N, ...] -> [N_pad, ...] with zero rows appended."""
    if t.shape[0] == n_pad:
        return t
    return torch.cat([t, t.new_zeros((n_pad - t.shape[0], *t.shape[1:]))])


def pack(parts: QuantParts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The kernel's layouts (see qgemm.c): weights [tiles * 16 * K (/2)] uint8, scales/offsets
    [tiles, K/G, 16] float32 (Q4_K: sc/m uint8, and super [tiles, K/256, 2, 16] float32; half:
    float16 bits as int16, which .to(dtype) leaves alone)."""
    N, K = parts.q.shape
    n_pad = (N + 15) // 16 * 16
    tiles = n_pad // 16
    q = _tiles(parts.q, n_pad)
    if parts.nibbles:  # byte 4i+j of each 64-byte block = q[i][k+j] | q[i][k+4+j] << 4
        q = q.view(tiles, 16, K // 8, 2, 4)
        packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3)  # [tiles, K/8, 16, 4]
    elif parts.q6k is not None:  # per 16 k: low nibbles of k..k+7, of k+8..k+15, then the 2-bit highs
        q = q.view(tiles, 16, K // 16, 4, 4)  # [tiles, row, chunk, step of 4 k, j]
        lo, hi = q & 15, q >> 4
        blocks = torch.stack([
            lo[:, :, :, 0] | (lo[:, :, :, 1] << 4),
            lo[:, :, :, 2] | (lo[:, :, :, 3] << 4),
            hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6),
        ], dim=3)  # [tiles, row, chunk, 3, j]
        packed = blocks.permute(0, 2, 3, 1, 4)  # [tiles, K/16, 3, 16, 4]
    else:  # byte 4i+j of each 64-byte block = q[i][k+j]
        packed = q.view(tiles, 16, K // 4, 4).permute(0, 2, 1, 3)  # [tiles, K/4, 16, 4]

    def grouped(t: torch.Tensor) -> torch.Tensor:  # [N, G'] -> [tiles, G', 16]
        return _tiles(t, n_pad).view(tiles, 16, -1).transpose(1, 2).contiguous()

    if parts.q6k is not None:
        sc, d = parts.q6k
        return packed.contiguous().view(-1), grouped(sc), None, grouped(d.float())
    if parts.q4k is not None:
        sc, m, d, dmin = parts.q4k
        super_scales = torch.stack([grouped(d.float()), grouped(-dmin.float())], dim=2)  # [tiles, K/256, 2, 16]
        return packed.contiguous().view(-1), grouped(sc), grouped(m), super_scales.contiguous()
    if parts.half:
        def bits(t: torch.Tensor) -> torch.Tensor:
            return grouped(t.half().view(torch.int16))
        return packed.contiguous().view(-1), bits(parts.scales), bits(parts.offsets), None
    offsets = None if parts.offsets is None else grouped(parts.offsets.float())
    return packed.contiguous().view(-1), grouped(parts.scales.float()), offsets, None


_local = threading.local()


def qgemm_scratch_bytes(in_features: int) -> int:
    """The scratch space qgemm needs for MAX_ROWS rows of in_features (see qgemm.c's qgemm)."""
    return MAX_ROWS * in_features + 64 + MAX_ROWS * (in_features // 16) * 8


def _scratch(nbytes: int) -> int:
    """The address of this thread's kernel scratch space of at least nbytes (kept: an allocation a call
    cost ~1.5 us; one per thread, as two threads may run models at once)."""
    buf = getattr(_local, "scratch", None)
    if buf is None or buf.numel() < nbytes:
        with torch.inference_mode(False):
            _local.scratch = buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf.data_ptr()


class QLinear(nn.Module):
    """y = x @ w.T (+ bias) with w stored as QuantParts, computed by the qgemm kernel."""

    def __init__(self, parts: QuantParts, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.lib = kernel()
        self.out_features, self.in_features = parts.q.shape
        if self.in_features % 32:
            raise ValueError(f"qgemm needs in_features divisible by 32, got {self.in_features}")
        if parts.layout == 0 and parts.offsets is None and parts.q.numel() and int(parts.q.max()) >= 2 * parts.zero_point:
            raise ValueError(f"qgemm's bytes with one zero point hold q < 2 * zero_point ({parts.zero_point:g}), "
                             f"got q = {int(parts.q.max())}")
        self.group, self.layout, self.zero_point = parts.group, parts.layout, float(parts.zero_point)
        weight, scales, offsets, super_scales = pack(parts)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("super_scales", super_scales)
        self.tiles = scales.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.scratch_bytes = qgemm_scratch_bytes(self.in_features)

    def _apply(self, fn, *args, **kwargs):  # .to() / .share_memory() may move the buffers
        self._pointers = None
        return super()._apply(fn, *args, **kwargs)

    def pointers(self) -> tuple:
        """The kernel's weight arguments (layout .. tiles), read once: data_ptr() costs ~0.5 us a call."""
        if getattr(self, "_pointers", None) is None:
            self._pointers = (
                self.weight.data_ptr(), self.layout, self.group, self.scales.data_ptr(),
                None if self.offsets is None else self.offsets.data_ptr(), self.zero_point,
                None if self.super_scales is None else self.super_scales.data_ptr(), self.tiles,
            )
        return self._pointers

    def into(self, rows: torch.Tensor, out: torch.Tensor, threads: int) -> None:
        """out[:, :16 * tiles] = rows @ w.T without the bias; rows: [M, K] float32 contiguous,
        out: [M, ldy] float32 with unit column stride (may be a column slice of a wider tensor)."""
        M, K = rows.shape
        ptrs, ldy = self.pointers(), out.stride(0)
        x, y, scratch = rows.data_ptr(), out.data_ptr(), _scratch(self.scratch_bytes)
        for start in range(0, M, MAX_ROWS):
            m = min(MAX_ROWS, M - start)
            rc = self.lib.qgemm(x + start * K * 4, m, K, *ptrs, y + start * ldy * 4, ldy, scratch, threads)
            if rc != 0:
                raise RuntimeError(f"qgemm refused M={m}, K={K}, group={self.group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] -> [M, N]
        rows = x.float().contiguous()  # no copy when x is float32 already
        out = torch.empty(rows.shape[0], self.tiles * 16, dtype=torch.float32)
        self.into(rows, out, torch.get_num_threads())
        y = out if out.shape[1] == self.out_features else out[:, : self.out_features]
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def kind(self) -> str:
        """The weights' form, in words (LAYOUTS)."""
        return LAYOUTS[self.layout]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.kind} group={self.group}, qgemm"
