"""workers/sampling/processors.py (and warp's min_p) against a straightforward per-row reference.

The reference rebuilds each row's context (tokens + the drafts before it) and
applies vLLM's definitions token by token in Python, in vLLM v1's order
(min_tokens, logit_bias, repetition, frequency, presence). The vectorized
pipeline must agree at every row: this catches a row that sees the wrong
drafts (off by one), a prompt token counted by presence/frequency, stages in
the wrong order, and a stop token left possible before min_tokens.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from protocol.messages import SamplingParams
from workers.sampling import STAGES, Rows, process_logits, warp, warp_with

V = 12


def reference(logits: torch.Tensor, rows: Rows, s: SamplingParams) -> torch.Tensor:
    out = logits.double().clone()
    for i in range(out.shape[0]):
        context = list(rows.tokens) + list(rows.drafts[:i])
        prompt, outputs = context[: rows.num_prompt], context[rows.num_prompt :]
        for v in range(out.shape[1]):
            x = out[i, v].item()
            if len(outputs) < s.min_tokens and v in rows.stop_token_ids:
                x = -math.inf
            x += s.logit_bias.get(v, 0.0)
            if v in prompt or v in outputs:
                x = x / s.repetition_penalty if x > 0 else x * s.repetition_penalty
            x -= s.frequency_penalty * outputs.count(v)
            x -= s.presence_penalty * (v in outputs)
            out[i, v] = x
    return out.float()


def random_case(seed: int):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_prompt = rng.randint(1, 6)
    tokens = [rng.randrange(V) for _ in range(num_prompt + rng.randint(0, 6))]
    num_rows = rng.randint(1, 5)
    drafts = [rng.randrange(V) for _ in range(num_rows - 1)]
    sampling = SamplingParams(
        temperature=1.0,
        presence_penalty=rng.choice([0.0, 0.7, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.4, -1.0]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        logit_bias={rng.randrange(V): rng.uniform(-5, 5) for _ in range(rng.randint(0, 3))},
        min_tokens=rng.randint(0, len(tokens) - num_prompt + num_rows),
    )
    rows = Rows(tokens, num_prompt, drafts, stop_token_ids=(0, 3))
    return torch.randn(num_rows, V, generator=g) * 3, rows, sampling


@pytest.mark.parametrize("seed", range(40))
def test_pipeline_equals_reference(seed):
    logits, rows, sampling = random_case(seed)
    torch.testing.assert_close(process_logits(logits, rows, sampling), reference(logits, rows, sampling))


def test_each_stage_alone_equals_reference():
    """One control at a time, each on a case where it changes something."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 3
    rows = Rows([1, 2, 2, 5, 5, 5, 7], num_prompt=3, drafts=[7, 9, 9], stop_token_ids=[0])
    for sampling in (
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(logit_bias={4: 10.0, 11: -100.0}),
        SamplingParams(min_tokens=6),
    ):
        out = process_logits(logits, rows, sampling)
        assert not torch.equal(out, logits), sampling
        torch.testing.assert_close(out, reference(logits, rows, sampling))


def test_penalties_count_drafts_before_the_row_only():
    """Row i sees drafts[:i]: a token drafted at row 1 is penalized from row 2 on, not at rows 0-1."""
    logits = torch.zeros(3, V)
    rows = Rows([1, 2], num_prompt=2, drafts=[6, 6])
    out = process_logits(logits, rows, SamplingParams(frequency_penalty=1.0))
    assert out[:, 6].tolist() == [0.0, -1.0, -2.0]
    assert out[:, 1].tolist() == [0.0, 0.0, 0.0]  # a prompt token: presence/frequency ignore it


def test_min_tokens_masks_stop_tokens_until_enough_are_out():
    logits = torch.zeros(4, V)
    rows = Rows([1, 2, 3], num_prompt=2, drafts=[4, 5, 6], stop_token_ids={0, 11})  # 1 output before row 0
    out = process_logits(logits, rows, SamplingParams(min_tokens=3))
    assert torch.isinf(out[:2, [0, 11]]).all() and (out[2:, [0, 11]] == 0).all()
    assert (out[:, 1:11] == 0).all()


def test_no_active_stage_returns_the_logits_untouched():
    logits = torch.randn(2, V)
    assert process_logits(logits, Rows([1], 1, [3]), SamplingParams(temperature=0.5, top_k=3, min_p=0.2)) is logits


def test_stage_table_order_is_vllms():
    assert [name for name, _, _ in STAGES] == ["min_tokens", "logit_bias", "penalties"]


def test_min_p_drops_tokens_below_the_scaled_maximum():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = warp(probs.log(), 1.0, min_p=0.3)  # threshold 0.15: 0.15 stays, 0.05 goes
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)
    assert out[0, 3] == 0


def test_min_p_applies_after_temperature_and_before_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    t, min_p = 0.5, 0.1
    scaled = torch.softmax(logits / t, -1)
    keep = scaled >= min_p * scaled.max()
    expected = torch.where(keep, scaled, torch.zeros_like(scaled))
    torch.testing.assert_close(warp(logits, t, min_p=min_p), expected / expected.sum())
    # then top_p over the min_p-filtered distribution (vLLM's order): at T = 2 the
    # probabilities are [.455, .276, .167, .102]; min_p 0.3 drops the last, leaving
    # [.507, .307, .186]; top_p 0.8 then keeps two. (Top-p first would keep three.)
    scaled = torch.softmax(logits / 2.0, -1)
    two = scaled[0, :2] / scaled[0, :2].sum()
    out = warp_with(logits, SamplingParams(temperature=2.0, min_p=0.3, top_p=0.8))
    torch.testing.assert_close(out, torch.cat([two, torch.zeros(2)]).view(1, -1))


@pytest.mark.parametrize("min_p", [-0.1, 1.5])
def test_min_p_out_of_range_is_refused(min_p):
    with pytest.raises(ValueError):
        warp(torch.zeros(1, 3), 1.0, min_p=min_p)


def test_the_input_logits_are_never_written():
    """The verifier reports logprobs from the raw logits after processing them: a stage
    writing into its input would change the reported logprobs."""
    logits, rows, _ = random_case(3)
    before = logits.clone()
    process_logits(logits, rows, SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, presence_penalty=1.0,
                                                 logit_bias={1: 2.0}, min_tokens=99))
    assert torch.equal(logits, before)
