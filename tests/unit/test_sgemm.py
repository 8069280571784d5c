"""The float32 kernel (workers/model/kernels/sgemm.c) behind Float32Linear: y = x w^T (+ b),
each output summed in one fixed order whatever the rows, the blocking and the thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tiny_model import make_tiny_checkpoint
from workers.model import load_model
from workers.model.linear import Float32Linear, PackedLinear, make_linear
from workers.model.qlinear import kernel, machine_can_build, machine_variants

# Skipped only where the machine lacks the CPU flags or a compiler; where it has them, a kernel
# that fails to build fails these tests.
pytestmark = pytest.mark.skipif(machine_can_build() is not None, reason=f"sgemm: {machine_can_build()}")


def sgemm(variant: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    y = torch.full((x.shape[0], w.shape[0]), float("nan"))
    rc = kernel(variant).sgemm(
        x.data_ptr(), x.shape[0], x.shape[1], w.data_ptr(), w.shape[0], None if bias is None else bias.data_ptr(),
        y.data_ptr(), w.shape[0], threads,
    )
    assert rc == 0
    return y


@pytest.mark.parametrize("variant", machine_variants())
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16, 47, 48, 49, 100])
def test_kernel_equals_the_matmul(variant, M):
    """N = 37 leaves a strip of 1 weight row; M crosses the 3-row blocks and the 48-row chunks.
    Catches a wrong index in any block shape, a remainder row or column skipped (the output
    starts as NaN), or the bias added to the wrong column."""
    g = torch.Generator().manual_seed(M)
    x, w, b = torch.randn(M, 72, generator=g), torch.randn(37, 72, generator=g), torch.randn(37, generator=g)
    for bias in (None, b):
        want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
        for threads in (1, 2):
            torch.testing.assert_close(sgemm(variant, x, w, bias, threads).double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", machine_variants())
def test_rows_do_not_depend_on_the_rest_of_the_call_nor_on_threads(variant):
    """Batch invariance, which the lossless contract needs (a row batched with others, or in a
    verification, must be bit for bit the row alone): catches a reduction order that depends on
    the block a row falls in, the chunk, the row count or the thread count."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(100, 576, generator=g), torch.randn(70, 576, generator=g)
    together = sgemm(variant, x, w, None, 2)
    alone = torch.cat([sgemm(variant, x[i : i + 1], w, None, 1) for i in range(100)])
    assert torch.equal(alone, together)
    for a, b in [(3, 4), (5, 12), (0, 17), (47, 100), (10, 64)]:
        assert torch.equal(sgemm(variant, x[a:b].contiguous(), w, None, 2), together[a:b])


def test_refuses_what_it_cannot_compute():
    x, w = torch.randn(2, 12), torch.randn(8, 12)
    assert kernel().sgemm(x.data_ptr(), 2, 12, w.data_ptr(), 8, None, torch.empty(2, 8).data_ptr(), 8, 1) == -1  # K % 8
    lin = Float32Linear(torch.randn(8, 16), None)
    with pytest.raises(TypeError, match="float32 rows"):
        lin(torch.randn(2, 16, dtype=torch.bfloat16))


def test_make_linear_serves_float32_through_the_kernel_where_it_can():
    """Catches the loader left on torch's float32 GEMM (slower here, and not invariant for 1 row),
    or the kernel given a fan-in it refuses (a crash at the first pass instead of torch's linear)."""
    w = torch.randn(40, 64)
    lin = make_linear(w, torch.randn(40), "none", torch.float32, "cpu")
    assert isinstance(lin, Float32Linear)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(lin(x), F.linear(x, w, lin.bias), atol=1e-5, rtol=1e-5)
    odd = make_linear(torch.randn(40, 60), None, "none", torch.float32, "cpu")
    assert not isinstance(odd, Float32Linear)
    assert not isinstance(make_linear(w, None, "none", torch.bfloat16, "cpu"), Float32Linear)


def test_a_tied_float32_head_shares_the_embedding(tmp_path):
    """Catches the head holding a second copy of the embedding (113 MB on SmolLM2-135M)."""
    model = load_model(make_tiny_checkpoint(tmp_path), dtype=torch.float32)  # tied embeddings
    assert isinstance(model.output, Float32Linear) and not isinstance(model.output, PackedLinear)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
