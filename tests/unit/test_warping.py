"""workers/sampling/warping.py against hand-computed small examples."""

import math

import pytest
import torch

from workers.sampling import logprobs_of, warp


def _logits(probs):
    return torch.tensor([probs], dtype=torch.float64).log().float()


def test_temperature_scales_logits():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    # T = 2 halves the logits: exp -> [1, sqrt 2, 2]
    z = 1 + math.sqrt(2) + 2
    expected = torch.tensor([[1 / z, math.sqrt(2) / z, 2 / z]])
    torch.testing.assert_close(warp(logits, temperature=2.0), expected)
    # T = 0.5 doubles them: exp -> [1, 4, 16]
    torch.testing.assert_close(warp(logits, temperature=0.5), torch.tensor([[1 / 21, 4 / 21, 16 / 21]]))


def test_temperature_one_is_softmax_in_float32():
    logits = torch.randn(3, 11, dtype=torch.bfloat16)
    out = warp(logits, 1.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(logits.float(), -1))


def test_top_k_keeps_k_largest():
    out = warp(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 1.0, top_k=2)
    e = math.e
    torch.testing.assert_close(out, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))
    assert out[0, 0] == 0 and out[0, 3] == 0  # exactly removed


def test_top_k_keeps_ties_with_kth():
    out = warp(torch.tensor([[2.0, 2.0, 0.0]]), 1.0, top_k=1)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.0]]))


@pytest.mark.parametrize("top_k", [0, 4, 5, 100])
def test_top_k_zero_or_at_least_vocab_keeps_all(top_k):
    logits = torch.randn(2, 4)
    torch.testing.assert_close(warp(logits, 0.7, top_k=top_k), torch.softmax(logits / 0.7, -1))


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.7, [0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),  # 0.5 < 0.7 <= 0.8
        (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # 0.8 < 0.9 <= 0.95
        (0.45, [1.0, 0.0, 0.0, 0.0]),  # the top token alone already has 0.5
        (0.01, [1.0, 0.0, 0.0, 0.0]),
        (1.0, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_top_p_keeps_smallest_set_reaching_mass(top_p, expected):
    out = warp(_logits([0.5, 0.3, 0.15, 0.05]), 1.0, top_p=top_p)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_top_p_unsorted_vocabulary_order():
    # same distribution, permuted: the kept set follows the tokens, not positions
    out = warp(_logits([0.15, 0.05, 0.5, 0.3]), 1.0, top_p=0.7)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.625, 0.375]]))


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = warp(logits, 1.0, top_p=1e-6)
    assert (out > 0).sum(-1).tolist() == [1, 1]
    assert out[0, 0] == 1.0
    assert out[1, 0] == 1.0  # ties: the lower token id comes first


def _nucleus_by_full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """top_p's definition, computed the plain way: sort each whole row (stable: equal
    probabilities by lower id), keep while the mass before a token is below top_p."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    drop_sorted = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p
    drop_sorted[..., 0] = False
    return ~torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


@pytest.mark.parametrize("spread", [0.3, 3.0, 12.0])  # flat rows (nucleus of thousands) to peaked (a few)
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.95, 0.999])
def test_top_p_keeps_what_a_full_sort_keeps(spread, top_p):
    """warp sorts only the tokens above a threshold (then lower ones, down to the whole row).
    Catches a threshold that splits tied tokens, a search that stops before the mass is
    reached in the running sum, or ties not broken by the lower id: the kept sets must be the
    full sort's exactly. Rows with many exact ties and a masked (-inf) tail are included."""
    g = torch.Generator().manual_seed(int(spread * 10))
    logits = torch.randn(12, 5000, generator=g) * spread
    logits[:4] = torch.round(logits[:4])  # many equal probabilities
    logits[4:6, 2500:] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    want = _nucleus_by_full_sort(probs, top_p)
    got = warp(logits, 1.0, top_p=top_p) > 0
    assert torch.equal(got, want), (got.sum(-1), want.sum(-1))


def test_top_k_then_top_p():
    # top_k=3 -> [.4, .3, .2]/.9 = [.444, .333, .222]; top_p=0.7 keeps the first two
    out = warp(_logits([0.4, 0.3, 0.2, 0.1]), 1.0, top_k=3, top_p=0.7)
    torch.testing.assert_close(out, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_sum_to_one(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 1000, generator=g) * 3).to(dtype)
    logits[:, :10] = float("-inf")  # already-masked entries stay at zero
    for kw in [{}, {"top_k": 50}, {"top_p": 0.9}, {"top_k": 7, "top_p": 0.5}]:
        out = warp(logits, 0.8, **kw)
        assert out.dtype == torch.float32 and out.shape == logits.shape
        torch.testing.assert_close(out.sum(-1), torch.ones(16))
        assert (out[:, :10] == 0).all()
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": -1.0}, {"temperature": 1.0, "top_p": 0.0},
                                {"temperature": 1.0, "top_k": -1}])
def test_invalid_arguments_raise(kw):
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 3), **kw)


def test_logprobs_of_is_raw_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]], dtype=torch.bfloat16)
    chosen, top_ids, top_lps = logprobs_of(logits, torch.tensor([0, 2]), num_top=2)
    ref = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(chosen, torch.stack([ref[0, 0], ref[1, 2]]))
    assert top_ids.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(top_lps, torch.stack([ref[0, [1, 2]], ref[1, [2, 3]]]))
    assert chosen.dtype == top_lps.dtype == torch.float32
    _, ids0, lps0 = logprobs_of(logits, torch.tensor([0, 2]), num_top=0)
    assert ids0.shape == (2, 0) and lps0.shape == (2, 0)
