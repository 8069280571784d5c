"""DraftEngine drives a layer-parallel draft unchanged: outputs stay the target's (greedy, float32)."""

from __future__ import annotations

import pytest
import torch

from configs.modes import mode_of
from protocol.messages import GenerateRequest, SamplingParams
from workers.easyspec import LayerParallelDraftModel, make_layer_plan
from tests.local_draft import LocalTransport, random_steps
from workers.engine import DraftEngine, DraftStream, NoDraft, VerifyEngine
from workers.model import load_model
from tests.tiny_model import make_tiny_checkpoint

MAX_LEN = 256
PROMPTS = [[5, 17, 42], [200, 3, 3, 3, 9, 1, 77], [11], [8, 6, 4, 2, 0, 1, 3, 5, 7, 9, 250, 251]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("es-engine"), n_layers=6, vocab_size=256, seed=0)
    return {
        "target": load_model(path, dtype=torch.float32),
        "draft": load_model(path, dtype=torch.float32, quantization="int8"),
    }


def serve(draft_model, target, mode: str, k: int = 4):
    if draft_model is None:
        engine = VerifyEngine(target, NoDraft(), max_model_len=MAX_LEN, max_running=3)
    else:
        draft = DraftEngine(draft_model, max_model_len=MAX_LEN, max_requests=3)
        steps = random_steps(seed=k) if mode == "amusd" else None
        source = DraftStream(
            LocalTransport(draft, steps), num_draft_tokens=k, max_run_ahead=2 * k, mode=mode_of(mode), timeout_s=60
        )
        engine = VerifyEngine(target, source, max_model_len=MAX_LEN, max_running=3)
    for i, prompt in enumerate(PROMPTS):
        engine.add(GenerateRequest(f"r{i}", prompt, 40, SamplingParams(), []))
    tokens: dict[str, list[int]] = {}
    drafted = accepted = 0
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            drafted += out.num_draft_tokens
            accepted += out.num_accepted_tokens
    return tokens, drafted, accepted


@pytest.mark.parametrize("mode", ["sd", "amusd"])
@pytest.mark.parametrize("variant", ["full", "attention"])
def test_layer_parallel_draft_is_lossless_under_the_engine(models, mode, variant):
    ar, _, _ = serve(None, models["target"], "ar")
    plan = make_layer_plan(6, 2, sequential_head=1, sequential_tail=1)
    draft = LayerParallelDraftModel.local(models["draft"], plan, variant=variant)
    spec, drafted, accepted = serve(draft, models["target"], mode)
    assert spec == ar
    stats = draft.stats()
    assert drafted > 0 and stats["fuzzy_passes"] > 0 and stats["calibrations"] > 0
    assert stats["calibrated_tokens"] > 0  # accepted drafts had their fuzzy KV replaced


def test_calibration_raises_acceptance_over_never(models):
    """The tiny random model is far from layer-parallel friendly; calibration still helps."""
    plan = make_layer_plan(6, 2, sequential_head=1, sequential_tail=1)
    rates = {}
    for policy in ("every_round", "never"):
        draft = LayerParallelDraftModel.local(models["draft"], plan, calibration=policy)
        _, drafted, accepted = serve(draft, models["target"], "sd")
        rates[policy] = accepted / drafted
    assert rates["every_round"] > rates["never"]
