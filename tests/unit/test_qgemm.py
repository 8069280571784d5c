"""The qgemm kernel (workers/model/kernels/qgemm.c) against its definition, computed in Python.

Definition: each 32-block of an activation row is quantized to int8 with scale max|x|/127
(round half to even), and per weight group g of G columns
    y[m, n] = sum_g s[n, g] * dx[m, b(g)] * sum_{k in g} q[n, k] * xq[m, k] + o[n, g] * sum_{k in g} x[m, k].
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.model import qlinear
from workers.model.qlinear import MAX_ROWS, QLinear, QuantParts, machine_can_build, machine_variants

# Skipped only where the machine lacks the CPU flags or a compiler; where it has them, a kernel
# that fails to build fails these tests.
pytestmark = pytest.mark.skipif(machine_can_build() is not None, reason=f"qgemm: {machine_can_build()}")


@pytest.fixture(autouse=True, params=machine_variants())
def variant(request, monkeypatch):
    """Every variant of the kernel this CPU runs (an AVX512 machine tests its AVX2 build too)."""
    build = qlinear.kernel
    monkeypatch.setattr(qlinear, "kernel", lambda: build(request.param))
    return request.param


def reference(x: torch.Tensor, p: QuantParts) -> torch.Tensor:
    """The kernel's arithmetic in float64: [M, K] -> [M, N]."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    dx = blocks.abs().amax(-1) / 127  # [M, K/32]
    inv = torch.where(dx > 0, 127 / blocks.abs().amax(-1), torch.zeros_like(dx))
    xq = torch.round(blocks * inv[..., None]).clamp(-128, 127).view(M, K).double()
    G = p.group
    q = p.q.double().view(p.q.shape[0], K // G, G)  # [N, K/G, G]
    isum = torch.einsum("ngk,mgk->mng", q, xq.view(M, K // G, G))  # [M, N, K/G]
    d = dx.double().repeat_interleave(32 // G, dim=1) if G < 32 else dx.double()  # [M, K/G]
    offsets = p.offsets if p.offsets is not None else -p.zero_point * p.scales
    sx = x.double().view(M, K // G, G).sum(-1)  # [M, K/G]
    return (p.scales.double()[None] * d[:, None] * isum).sum(-1) + (offsets.double()[None] * sx[:, None]).sum(-1)


def parts(kind: str, N: int, K: int, seed: int = 0) -> QuantParts:
    g = torch.Generator().manual_seed(seed)
    if kind == "q4k":  # Q4_K's own layout: six-bit sc, m per 32; d, dmin per 256
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        sc = torch.randint(0, 64, (N, K // 32), generator=g, dtype=torch.uint8)
        m = torch.randint(0, 64, (N, K // 32), generator=g, dtype=torch.uint8)
        d, dmin = torch.rand(N, K // 256, generator=g) * 0.01, torch.rand(N, K // 256, generator=g) * 0.01
        scales = d.repeat_interleave(8, dim=1) * sc.float()
        offsets = -dmin.repeat_interleave(8, dim=1) * m.float()
        return QuantParts(q, scales, offsets, 0.0, 32, True, (sc, m, d, dmin))
    if kind == "q6k-6bit":  # Q6_K's own layout: q in six bits, int8 sc per 16, d per 256
        q = torch.randint(0, 64, (N, K), generator=g, dtype=torch.uint8)
        sc = torch.randint(-128, 128, (N, K // 16), generator=g, dtype=torch.int8)
        d = torch.rand(N, K // 256, generator=g) * 0.001
        scales = d.repeat_interleave(16, dim=1) * sc.float()
        return QuantParts(q, scales, None, 32.0, 16, False, None, (sc, d))
    if kind == "nibbles":
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        return QuantParts(q, torch.rand(N, K // 32, generator=g) * 0.1, torch.randn(N, K // 32, generator=g) * 0.1, 0.0, 32, True)
    if kind == "nibbles-half":  # float16 scales and offsets (gguf-q4's re-quantized draft weights)
        q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
        scales, offsets = torch.rand(N, K // 32, generator=g) * 0.1, torch.randn(N, K // 32, generator=g) * 0.1
        return QuantParts(q, scales.half().float(), offsets.half().float(), 0.0, 32, True, half=True)
    group, top, zero = {"q6k": (16, 64, 32.0), "q8": (32, 256, 128.0), "q5": (32, 32, 16.0)}[kind]
    q = torch.randint(0, top, (N, K), generator=g, dtype=torch.uint8)
    return QuantParts(q, torch.rand(N, K // group, generator=g) * 0.1, None, zero, group, False)


@pytest.mark.parametrize("kind", ["nibbles", "nibbles-half", "q4k", "q6k", "q6k-6bit", "q8", "q5"])
@pytest.mark.parametrize("M", [1, 3, 8, 11])
def test_kernel_equals_its_definition(kind, M):
    """Catches a wrong weight layout (pack vs kernel), a scale/offset/zero point misapplied (or
    Q4_K's d/dmin super-block scales read from the wrong block), a wrong activation
    quantization, a padded row (N=40) leaking, or rows past 8 dropped; for half scales, scales
    or offsets read as float32 (or from another group)."""
    N, K = 40, 512
    p = parts(kind, N, K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    got = QLinear(p, None, torch.float32)(x)
    want = reference(x, p)
    assert got.shape == (M, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_rows_do_not_depend_on_the_rest_of_the_pass_nor_on_threads():
    """Batch invariance, which the lossless contract needs (a verification pass must compute a
    row as a decode step does): catches any cross-row or thread-count dependence, bit for bit."""
    p = parts("q4k", 96, 512)
    lin = QLinear(p, torch.randn(96), torch.float32)
    x = torch.randn(MAX_ROWS, 512, generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([lin(x[i : i + 1]) for i in range(MAX_ROWS)])
        torch.set_num_threads(2)
        together = lin(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)
    assert torch.equal(lin(x[:3]), together[:3])


@pytest.mark.parametrize("tiles", [2, 5, 7, 33])
def test_every_tile_is_computed_once_whatever_the_threads(tiles):
    """The tiles are shared out between threads, which take the rest of each other's shares
    when done (qgemm.c's TILES): catches a tile skipped (its columns left as torch.empty gave
    them) or a share's bounds off by one, for tile counts that do not divide evenly."""
    p = parts("q4k", 16 * tiles, 256)
    lin = QLinear(p, None, torch.float32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(tiles))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = lin(x)
        for n in (2, 3, 5):
            torch.set_num_threads(n)
            for _ in range(3):
                assert torch.equal(lin(x), want)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(want.double(), reference(x, p), rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("M", [1, 5])
def test_half_scales_give_what_the_same_float32_scales_give(M):
    """Scales and offsets that are float16 values, read as float16 (layout 3, 5 bits a weight)
    or as float32 (layout 1, 6): the same sums bit for bit. Catches a half scale or offset read
    from the wrong group or tile, or converted wrongly."""
    p = parts("nibbles-half", 48, 256, seed=4)
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(5))
    half, full = QLinear(p, None, torch.float32), QLinear(dataclasses.replace(p, half=False), None, torch.float32)
    assert (half.layout, full.layout) == (3, 1) and half.scales.nbytes * 2 == full.scales.nbytes
    assert torch.equal(half(x), full(x))


def test_weights_and_bias_reach_the_output():
    """Catches a bias dropped, or an output row computed from the wrong weight row."""
    p = parts("q8", 32, 64)
    bias = torch.arange(32, dtype=torch.float32)
    x = torch.zeros(1, 64)
    torch.testing.assert_close(QLinear(p, bias, torch.float32)(x), bias[None])
    x = torch.randn(2, 64)
    dense = x.double() @ p.dequantize().double().t()
    got = QLinear(p, None, torch.float32)(x).double()
    assert ((got - dense).abs().max() / dense.abs().max()) < 0.05  # int8 activations


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="divisible by 32"):
        QLinear(QuantParts(torch.zeros(16, 48, dtype=torch.uint8), torch.ones(16, 3), None, 0.0, 16, False), None, torch.float32)
    with pytest.raises(ValueError, match="q < 2 \\* zero_point"):  # the AVX2 kernel sums Q5_0's q unsplit
        QLinear(QuantParts(torch.full((16, 64), 32, dtype=torch.uint8), torch.ones(16, 2), None, 16.0, 32, False), None, torch.float32)


@pytest.mark.parametrize("kind, top", [("q8", 255), ("q5", 31), ("q6k", 63), ("q6k-6bit", 63), ("q4k", 15), ("nibbles", 15)])
def test_weights_and_activations_at_their_extremes_are_exact(kind, top):
    """Every weight at its format's largest value (or 0) against activations of +-127: the
    integer dot products must stay exact where an int16 intermediate (AVX2's vpmaddubsw) would
    saturate: 255 * 127 * 2 > 32767."""
    # catches: maddubs saturation on 8-bit weights (and int16 sums of too many steps of 5 or 6 bits)
    N, K = 32, 512
    g = torch.Generator().manual_seed(3)
    q = torch.full((N, K), top, dtype=torch.uint8)
    q[N // 2 :] = torch.randint(0, 2, (N - N // 2, K), generator=g, dtype=torch.uint8) * top  # 0 or top
    p = dataclasses.replace(parts(kind, N, K), q=q)
    signs = torch.randint(0, 2, (2, K), generator=g).float() * 2 - 1
    x = torch.cat([torch.ones(1, K), -torch.ones(1, K), signs])  # quantized to +-127 exactly
    got = QLinear(p, None, torch.float32)(x).double()
    want = reference(x, p)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
