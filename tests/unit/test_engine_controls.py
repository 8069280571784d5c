"""Sampling controls (penalties, logit_bias, min_p, min_tokens) in the engine loops, in-process.

Greedy float32: every speculative mode emits the target-alone (`ar`) tokens
with each control on. Sampling: the first two tokens follow the processed
target's joint law. The draft applies the same processing (its greedy drafts
are the reference argmax of its processed logits), which keeps acceptance high.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.messages import BeginDrafting, SamplingParams
from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_engine import MAX_LEN, PROMPTS, _chi2_pvalue, _joint_counts, make_engine, models, request, run
from tests.unit.test_processors import reference
from workers.engine import DraftEngine, PlainDraft
from workers.model import load_model
from workers.sampling import Rows, warp_with

__all__ = ["models"]  # the module-scoped fixture, shared with test_engine

CONTROLS = {
    "repetition": SamplingParams(repetition_penalty=1.8),
    "frequency": SamplingParams(frequency_penalty=1.5),
    "presence": SamplingParams(presence_penalty=2.0),
    "logit_bias": SamplingParams(logit_bias={7: 6.0, 200: 4.0, 3: -100.0}),
    "all": SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={9: 3.0}),
}


def greedy_tokens(engine, sampling, stop=()):
    requests = [request(i, p, max_tokens=30, sampling=sampling, stop=stop) for i, p in enumerate(PROMPTS)]
    results = run(engine, requests)
    outputs = [o for _, _, outs in results.values() for o in outs]
    return {r: results[r][0] for r in results}, outputs


_AR: dict = {}


def ar_tokens(models, control):
    """The target alone, greedy, with a control of CONTROLS (None: none), once per module."""
    if control not in _AR:
        sampling = CONTROLS[control] if control else SamplingParams()
        _AR[control] = greedy_tokens(make_engine(models["target"]), sampling)[0]
    return _AR[control]


@pytest.mark.parametrize("mode,draft", [("sd", "quantized"), ("amusd", "quantized"), ("sd", "stranger")])
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_greedy_with_controls_equals_ar(models, control, mode, draft):
    """Catches a verifier row that sees the wrong drafts (penalties off by one
    position) and a draft that skips the processing (acceptance collapses)."""
    sampling = CONTROLS[control]
    ar = ar_tokens(models, control)
    assert ar != ar_tokens(models, None)  # the control changes the text: the comparison below means something
    spec, outputs = greedy_tokens(make_engine(models["target"], models[draft], k=4, mode=mode, run_ahead=8), sampling)
    assert spec == ar
    drafted = sum(o.num_draft_tokens for o in outputs)
    if draft == "quantized":
        # with the processing 0.87-1.0 here; a draft without it: 0.04-0.72
        assert sum(o.num_accepted_tokens for o in outputs) / drafted > 0.8


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_min_tokens_holds_the_stop_token_back_in_every_mode(models, mode):
    """The stop token (here the 3rd token the target would emit) is impossible until 12 tokens are out."""
    stop = ar_tokens(models, None)["r1"][2]
    early, _ = greedy_tokens(make_engine(models["target"]), SamplingParams(), stop=[stop])
    assert len(early["r1"]) == 3
    sampling = SamplingParams(min_tokens=12)
    ar, _ = greedy_tokens(make_engine(models["target"]), sampling, stop=[stop])
    assert len(ar["r1"]) >= 12 and stop not in ar["r1"][:11]
    spec, _ = greedy_tokens(make_engine(models["target"], models["quantized"], k=4, mode=mode), sampling, stop=[stop])
    assert spec == ar


def test_the_draft_applies_the_processing_to_its_own_drafts(models):
    """Its greedy drafts are the reference argmax of its processed logits, penalties
    counting the tokens it drafted itself (the FR draft would otherwise repeat)."""
    sampling = SamplingParams(frequency_penalty=1.0, repetition_penalty=1.5, logit_bias={5: 2.0})
    prompt = PROMPTS[1]
    engine = DraftEngine(PlainDraft(models["quantized"]), max_model_len=MAX_LEN, max_requests=1)
    engine.begin(BeginDrafting("a", 0, prompt + [9, 9], 8, sampling, num_prompt_tokens=len(prompt)))
    drafted = []
    while (d := engine.step()) is not None:
        drafted += d.token_ids
    model = models["quantized"]
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(8):
            tokens = prompt + [9, 9] + expected
            logits = model.forward(torch.tensor(tokens), model.new_cache(64))
            expected.append(int(reference(logits, Rows(tokens, len(prompt)), sampling)[0].argmax()))
    assert drafted == expected


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_sampling_with_controls_matches_the_processed_target(tmp_path_factory, mode):
    """The first two tokens follow the law of the target processed by penalties,
    logit_bias and min_p (then temperature, top-k): a verifier that warped raw
    logits, or rows that ignored the draft before them, fail the check."""
    vocab = 8
    target = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8t"), vocab_size=vocab, seed=3), dtype=torch.float32)
    draft = load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("v8d"), vocab_size=vocab, seed=4), dtype=torch.float32)
    params = dict(temperature=0.9, top_k=7, min_p=0.05, repetition_penalty=1.6, frequency_penalty=0.8,
                  presence_penalty=0.5, logit_bias={2: 1.5, 5: -1.0})
    prompt = [1, 2, 3]
    trials = 2500
    engine = make_engine(target, draft, k=2, max_running=4, mode=mode, run_ahead=3)
    requests = [request(i, prompt, max_tokens=3, sampling=SamplingParams(seed=i, **params)) for i in range(trials)]
    observed = _joint_counts([tokens for tokens, _, _ in run(engine, requests).values()], vocab)

    def joint(model, processed=True):
        sampling = SamplingParams(**params) if processed else SamplingParams(temperature=0.9, top_k=7, min_p=0.05)

        def dist(tokens):
            logits = model.forward(torch.tensor(tokens), model.new_cache(16))
            return warp_with(reference(logits, Rows(tokens, len(prompt)), sampling), sampling)[0]

        with torch.inference_mode():
            first = dist(prompt)
            second = torch.stack([dist(prompt + [t]) for t in range(vocab)])
        return (first[:, None] * second).ravel().numpy().astype(np.float64)

    assert _chi2_pvalue(observed, joint(target)) > 1e-3
    # the same check rejects the unprocessed target's law and the draft's: it has power
    assert _chi2_pvalue(observed, joint(target, processed=False)) < 1e-6
    assert _chi2_pvalue(observed, joint(draft)) < 1e-6
