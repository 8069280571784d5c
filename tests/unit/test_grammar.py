"""Grammar-constrained decoding: the mask stage, its state, and the engines with it (in-process)."""

from __future__ import annotations

import json

import jsonschema
import msgspec
import numpy as np
import pytest
import torch

from protocol.messages import Grammar, SamplingParams
from tests.tiny_model import make_digit_tokenizer, make_tiny_checkpoint
from tests.unit.test_engine import _chi2_pvalue, _joint_counts, check_drafting, make_engine, request, run
from workers.easyspec import LayerParallelDraftModel, make_layer_plan
from workers.model import load_model
from workers.sampling import warp
from protocol.grammars import GrammarError, compile_grammar
from workers.sampling.grammar import Grammars, apply_bitmask, bitmask_allows, draft_scores

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
DIGITS = 7  # the digit tokenizer: "0".."6", EOS = 7
EOS = DIGITS


def json_grammar(schema: dict, stops) -> Grammar:
    return Grammar("json_schema", json.dumps(schema), tuple(stops))


# -- the mask itself ---------------------------------------------------------------------


def test_bitmask_bits_map_to_token_ids():
    """Bit j of word w is token 32 w + j, bit 31 (the sign bit) included; a wrong
    bit order or sign handling would allow the wrong tokens."""
    bitmask = torch.tensor([[1 | (1 << 5), -(2**31)], [0, 1]], dtype=torch.int32)
    allowed = bitmask_allows(bitmask, 64)
    assert allowed[0].nonzero().flatten().tolist() == [0, 5, 63]
    assert allowed[1].nonzero().flatten().tolist() == [32]
    assert bitmask_allows(bitmask, 40).shape == (2, 40)  # bits past the vocabulary are dropped
    logits = torch.arange(128, dtype=torch.float32).view(2, 64)
    masked = apply_bitmask(logits, bitmask)
    assert masked[0, 5] == 5 and masked[1, 32] == 96 and torch.isinf(masked[0, 1]) and torch.isinf(masked[1, 0])
    assert torch.equal(logits, torch.arange(128, dtype=torch.float32).view(2, 64))  # the raw logits are kept


@pytest.fixture(scope="module")
def digit_dir(tmp_path_factory):
    return make_digit_tokenizer(tmp_path_factory.mktemp("digits"), DIGITS)


def integer_mask(previous: list[int]) -> list[int]:
    """A JSON integer over the digit vocabulary, written by hand: no leading zero,
    EOS only after a complete number, nothing but EOS after a leading 0 or after EOS."""
    if not previous:
        return list(range(DIGITS))
    if previous[0] == 0 or EOS in previous:
        return [EOS]
    return list(range(DIGITS)) + [EOS]


def test_state_masks_positions_after_the_drafts_and_rolls_back(digit_dir):
    """mask_rows gives row i as the grammar stands after drafts[:i], leaves the state
    where it was, and a truncated state masks as a fresh one: a state that does not
    roll back would constrain the next round from the wrong position."""
    grammars = Grammars(digit_dir, DIGITS + 1)
    state = grammars.state(json_grammar({"type": "integer"}, [EOS]))
    for drafts in ([3, 0, 5, EOS], [0, EOS], [2, EOS, EOS]):
        rows = bitmask_allows(state.mask_rows(drafts), DIGITS + 1)
        for i in range(len(drafts) + 1):
            assert rows[i].nonzero().flatten().tolist() == integer_mask(drafts[:i]), (drafts, i)
        assert state.num_tokens == 0
    rows = bitmask_allows(state.mask_rows([0, 4, 1]), DIGITS + 1)  # 4 is forbidden after a leading 0
    assert rows[2].all() and rows[3].all()  # rows past a forbidden draft are never used: left open
    state.append([4, 4, 4])
    state.truncate(1)
    assert bitmask_allows(state.next_mask(), DIGITS + 1)[0].nonzero().flatten().tolist() == integer_mask([4])
    with pytest.raises(GrammarError):
        grammars.state(json_grammar({"type": "integer"}, [EOS])).append([0, 3])


def test_bad_schemas_are_refused():
    with pytest.raises(GrammarError):
        compile_grammar(Grammar("json_schema", "{not json", (2,)))
    with pytest.raises(GrammarError):
        compile_grammar(Grammar("json_schema", json.dumps({"type": "no-such-type"}), (2,)))
    with pytest.raises(GrammarError):
        compile_grammar(Grammar("lark", "start: x", (2,)))


def test_a_draft_row_with_no_allowed_finite_logit_is_uniform_over_the_allowed(digit_dir):
    """A reduced draft head can give -inf to every token the grammar allows: the draft
    then proposes among the allowed ones (argmax of an all -inf row would be a forbidden 0)."""
    state = Grammars(digit_dir, DIGITS + 1).state(json_grammar({"type": "integer"}, [EOS]))
    state.append([0])
    logits = torch.full((1, DIGITS + 1), float("-inf"))
    logits[0, 3] = 1.0
    scores = draft_scores(state, logits)
    assert int(scores.argmax()) == EOS and torch.isfinite(scores).sum() == 1


# -- the engines with a grammar ----------------------------------------------------------


@pytest.fixture(scope="module")
def json_models(tmp_path_factory, smollm_dir):
    """A 6-layer tiny random Llama on SmolLM2's tokenizer; an int8 copy and a stranger as drafts."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("g-t"), n_layers=6, tokenizer_dir=smollm_dir, seed=0)
    stranger = make_tiny_checkpoint(tmp_path_factory.mktemp("g-s"), tokenizer_dir=smollm_dir, seed=1)
    target = load_model(path, dtype=torch.float32)
    return {
        "grammars": Grammars(path, target.args.vocab_size),
        "tokenizer_dir": path,
        "target": target,
        "quantized": load_model(path, dtype=torch.float32, quantization="int8"),
        "stranger": load_model(stranger, dtype=torch.float32),
    }


JSON_PROMPTS = [[5, 17, 42], [200, 3, 3, 3, 9, 1, 77], [11]]


def json_requests(models, sampling=SamplingParams(), max_tokens=120):
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(models["tokenizer_dir"]).eos_token_id
    sampling = msgspec.structs.replace(sampling, grammar=json_grammar(SCHEMA, [eos]))
    return [request(i, p, max_tokens=max_tokens, sampling=sampling, stop=[eos]) for i, p in enumerate(JSON_PROMPTS)]


def decoded_json(models, tokens: list[int]):
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(models["tokenizer_dir"]).decode(tokens, skip_special_tokens=True)
    return json.loads(text)


def test_random_model_output_parses_and_validates_with_the_grammar(json_models):
    """A random model writes no JSON by itself; with the grammar its greedy output
    (ar, the target alone) must parse and validate, and end with EOS ("stop")."""
    ar = run(make_engine(json_models["target"], grammars=json_models["grammars"]), json_requests(json_models))
    unconstrained = run(make_engine(json_models["target"]), [request(0, JSON_PROMPTS[0], max_tokens=30)])
    with pytest.raises(ValueError):
        decoded_json(json_models, unconstrained["r0"][0])  # the test has power: without it, no JSON
    for tokens, finish, _ in ar.values():
        assert finish == "stop"
        jsonschema.validate(decoded_json(json_models, tokens[:-1]), SCHEMA)


@pytest.mark.parametrize(
    "mode,draft,k", [("sd", "quantized", 4), ("sd", "stranger", 3), ("amusd", "quantized", 4), ("easyspec", "quantized", 4)]
)
def test_speculative_equals_ar_greedy_with_a_grammar(json_models, mode, draft, k):
    """Greedy float32 with the grammar on: every mode emits ar's tokens (the draft and
    the target mask each position alike; a stranger draft forces rollbacks of the
    draft's grammar state), and the drafts are mostly accepted (the draft masks too)."""
    grammars = json_models["grammars"]
    ar = run(make_engine(json_models["target"], grammars=grammars), json_requests(json_models))
    draft_model = json_models[draft]
    if mode == "easyspec":
        plan = make_layer_plan(6, 2, sequential_head=1, sequential_tail=1)
        draft_model = LayerParallelDraftModel.local(draft_model, plan, variant="full")
    engine = make_engine(json_models["target"], draft_model, k=k, mode="sd" if mode == "easyspec" else mode,
                         run_ahead=2 * k, grammars=grammars)
    spec = run(engine, json_requests(json_models))
    assert {r: v[0] for r, v in spec.items()} == {r: v[0] for r, v in ar.items()}
    check_drafting(engine, spec, stranger=draft == "stranger")


def test_request_without_grammars_is_rejected(json_models):
    """A worker built without a grammar factory refuses a constrained request
    instead of serving it unconstrained."""
    from workers.engine import RequestRejected

    engine = make_engine(json_models["target"])
    with pytest.raises(RequestRejected):
        engine.add(json_requests(json_models)[0])


ENUM = {"enum": [12, 3, 45, 560]}
ENUM_NEXT = {1: [2], 3: [EOS], 4: [5], 5: [6]}  # by hand: what may follow each first token


def enum_mask(previous: list[int]) -> list[int]:
    if not previous:
        return sorted(ENUM_NEXT)
    return ENUM_NEXT.get(previous[0], [EOS])  # a forbidden first token: any row will do (weight 0)


@pytest.mark.parametrize("mode", ["ar", "sd", "amusd"])
def test_sampling_with_a_grammar_matches_the_constrained_target(tmp_path_factory, digit_dir, mode):
    """The first two tokens follow the law of the constrained target warp(mask(logits)),
    with a draft of other weights; the unconstrained law is rejected (the mask matters)."""
    vocab = DIGITS + 1
    target_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("dg-t"), tokenizer_dir=digit_dir, seed=3)
    draft_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("dg-d"), tokenizer_dir=digit_dir, seed=4)
    target, draft = (load_model(d, dtype=torch.float32) for d in (target_dir, draft_dir))
    assert target.args.vocab_size == vocab
    params = dict(temperature=0.9, top_k=6, top_p=0.95)
    prompt = [1, 2, 3]
    grammar = json_grammar(ENUM, [EOS])
    engine = make_engine(target, None if mode == "ar" else draft, k=2, max_running=4, mode=mode, run_ahead=3,
                         grammars=Grammars(digit_dir, vocab))
    trials = 2500
    requests = [request(i, prompt, max_tokens=3, sampling=SamplingParams(seed=i, grammar=grammar, **params),
                        stop=[EOS]) for i in range(trials)]
    results = run(engine, requests)
    observed = _joint_counts([tokens for tokens, _, _ in results.values()], vocab)

    def joint(masked: bool):
        def probs(tokens):
            with torch.inference_mode():
                logits = target.forward(torch.tensor(prompt + tokens), target.new_cache(16))
            if masked:
                allowed = torch.zeros(vocab, dtype=torch.bool)
                allowed[enum_mask(tokens)] = True
                logits = logits.masked_fill(~allowed, float("-inf"))
            return warp(logits, **params)[0]

        first = probs([])
        rows = torch.stack([probs([t]) for t in range(vocab)])
        return (first[:, None] * rows).ravel().numpy().astype(np.float64)

    assert _chi2_pvalue(observed, joint(masked=True)) > 1e-3
    assert _chi2_pvalue(observed, joint(masked=False)) < 1e-6


@pytest.mark.parametrize("mode", ["ar", "sd"])
@pytest.mark.parametrize("greedy", [True, False])
def test_the_grammar_wins_over_min_tokens(tmp_path_factory, digit_dir, mode, greedy):
    """min_tokens holds back the stop token, but a finished document allows only it: the
    grammar wins and the request stops at the end of its document. Without the rule every
    score of that row is -inf: greedy picks token 0 (out of the grammar), sampling draws NaN."""
    vocab = DIGITS + 1
    target_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("mt-t"), tokenizer_dir=digit_dir, seed=3)
    draft_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("mt-d"), tokenizer_dir=digit_dir, seed=4)
    target, draft = (load_model(d, dtype=torch.float32) for d in (target_dir, draft_dir))
    engine = make_engine(target, None if mode == "ar" else draft, k=2, max_running=4, mode=mode, run_ahead=3,
                         grammars=Grammars(digit_dir, vocab))
    sampling = dict(min_tokens=5, grammar=json_grammar({"enum": [3]}, [EOS]))
    if not greedy:
        sampling.update(temperature=1.0, seed=7)
    results = run(engine, [request(0, [1, 2, 3], max_tokens=8, sampling=SamplingParams(**sampling), stop=[EOS])])
    assert results["r0"][:2] == ([3, EOS], "stop")
