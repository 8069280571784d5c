"""The elementwise pieces of a layer in C (workers/model/kernels/elementwise.c, through
workers/model/elementwise.py): RMSNorm, RoPE and the SiLU gate, each row on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import make_tiny_checkpoint
from workers.model import elementwise, load_model
from workers.model.qlinear import machine_can_build

# Skipped only where the machine lacks the CPU flags or a compiler; where it has them, a kernel
# that fails to build fails these tests.
pytestmark = pytest.mark.skipif(machine_can_build() is not None, reason=f"elementwise: {machine_can_build()}")


def _rows(M: int, K: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * scale


def test_rms_norm_equals_the_definition():
    """Rows from 1e-3 to 1e3 in scale, given as a column slice of a wider tensor (row stride not
    K). Catches a wrong mean (K vs 8 lanes), eps outside the root, the weight skipped, a row
    read at the wrong stride."""
    wide = _rows(9, 200, 1)
    wide[:3] *= 1e-3
    wide[3:6] *= 1e3
    x = wide[:, 8:136]  # K = 128, rows 200 floats apart
    w = torch.randn(128, generator=torch.Generator().manual_seed(2))
    got = elementwise.rms_norm(x, w, 1e-5)
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


def test_rows_do_not_depend_on_the_batch_or_the_threads():
    """Each kernel on 300 rows (enough for its threaded loop) against each row alone, with 1 and
    2 threads, bit for bit. Catches a sum order or a vector tail that depends on the row's place
    in the call or on the thread split (it would break greedy equality under load)."""
    x, w = _rows(300, 576, 3), torch.randn(576)
    gu = _rows(300, 2 * 1536, 4)
    cos, sin = torch.randn(300, 1, 64), torch.randn(300, 1, 64)
    qkv = _rows(300, 15 * 64, 5)
    pieces = [
        lambda a, b: elementwise.rms_norm(x[a:b], w, 1e-6),
        lambda a, b: elementwise.silu_mul(gu[a:b], 1536),
        lambda a, b: elementwise.rope(qkv[a:b], 12, 64, cos[a:b], sin[a:b]),
    ]
    before = torch.get_num_threads()
    try:
        for piece in pieces:
            torch.set_num_threads(2)
            full = piece(0, 300)
            torch.set_num_threads(1)
            assert torch.equal(piece(0, 300), full)
            assert torch.equal(torch.cat([piece(i, i + 1) for i in range(300)]), full)
    finally:
        torch.set_num_threads(before)


def test_rope_equals_rotate_half():
    """transformers' definition, x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1),
    on the first 12 heads of rows that carry more columns (the values). Catches the halves
    swapped the wrong way, a head or row stride off, the value columns rotated."""
    T, heads, D = 5, 12, 128
    qkv = _rows(T, (heads + 4) * D, 6)
    angle = torch.rand(T, 1, D // 2, generator=torch.Generator().manual_seed(7)) * 6
    cos = torch.cat([angle.cos(), angle.cos()], -1)
    sin_plain = torch.cat([angle.sin(), angle.sin()], -1)
    sin_signed = torch.cat([-angle.sin(), angle.sin()], -1)  # the tables' layout (model.rope_tables)
    got = elementwise.rope(qkv, heads, D, cos, sin_signed)
    x = qkv[:, : heads * D].view(T, heads, D).double()
    rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
    want = x * cos.double() + rotated * sin_plain.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def test_silu_mul_equals_the_definition_at_every_magnitude():
    """Gates from -100 to 100, signed zeros and denormal-small values. Catches the sigmoid's
    branch for negative gates inverted, exp overflowing for large |g| (inf or NaN), the up
    half read from the wrong columns."""
    gu = _rows(4, 2 * 64, 8, scale=8.0)
    gu[0, :16] = torch.tensor([-100, -90, -30, -0.0, 0.0, 30, 90, 100, 1e-30, -1e-30, 1e-3, -1e-3, 5, -5, 0.5, -0.5])
    got = elementwise.silu_mul(gu, 64)
    g, u = gu[:, :64].double(), gu[:, 64:].double()
    want = g * torch.sigmoid(g) * u
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-30)


def test_other_dtypes_take_torchs_ops():
    """bf16 rows are not the kernel's: the result is torch's, bit for bit. Catches a bf16 tensor
    handed to a float32 kernel (garbage)."""
    x = _rows(3, 64, 9).bfloat16()
    w = torch.randn(64).bfloat16()
    assert torch.equal(elementwise.rms_norm(x, w, 1e-5), F.rms_norm(x, w.shape, w, 1e-5))
    gu = _rows(3, 128, 10).bfloat16()
    assert torch.equal(elementwise.silu_mul(gu, 64), F.silu(gu[:, :64]) * gu[:, 64:])


def test_a_model_with_the_kernels_matches_torchs_ops(tmp_path, monkeypatch):
    """A tiny Llama's prefill and decode logits, kernels against torch's ops (native() false).
    Catches a wiring slip the unit checks cannot see: RoPE over the wrong heads, the SiLU gate
    given another split than the MLP's, a norm's weight from another layer."""
    model = load_model(make_tiny_checkpoint(tmp_path), dtype=torch.float32)
    tokens = torch.randint(0, model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(11))

    def run() -> torch.Tensor:
        cache = model.new_cache(64)
        with torch.inference_mode():
            prefill = model.forward(tokens[:14], cache, num_logits=14)
            steps = [model.forward(tokens[i : i + 1], cache) for i in range(14, 20)]
        return torch.cat([prefill, *steps])

    with_kernels = run()
    monkeypatch.setattr(elementwise, "native", lambda x: False)
    torch.testing.assert_close(with_kernels, run(), rtol=1e-4, atol=1e-4)
