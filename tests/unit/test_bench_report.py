"""bench/report.py (and the harness's response parsing) on synthetic data, no server."""

import json

import pytest

from pathlib import Path

from bench.harness import DEFAULT_PROMPTS, BenchError, Prompt, Run, ServerProcess, Settings, load_prompts, parse_response
from bench.report import (
    ModeResult,
    RequestResult,
    first_difference,
    pooled,
    round_rows,
    rounds_markdown,
    summarize,
    to_json,
    to_markdown,
    top2_margin,
)


def req(pid, tokens, wall, drafted=None, accepted=None, passes=None, top=None):
    return RequestResult(
        prompt_id=pid,
        kind="completion",
        prompt=f"prompt {pid}",
        text="".join(tokens),
        completion_tokens=len(tokens),
        wall_s=wall,
        tokens=list(tokens),
        top_logprobs=top,
        num_draft_tokens=drafted,
        num_accepted_tokens=accepted,
        num_target_passes=passes,
    )


@pytest.fixture
def results():
    ar = ModeResult(
        "ar",
        [
            req("a", ["x", "y", "z", "w"], 2.0, 0, 0, 4, top=[[-0.1, -3.0], [-0.2, -2.0], [-0.5, -0.51], [-0.1, -4.0]]),
            req("b", ["p", "q"], 2.0, 0, 0, 2, top=[[-0.1, -3.0], [-0.3, -1.0]]),
        ],
    )
    sd = ModeResult(
        "sd",
        [
            req("a", ["x", "y", "Z", "w"], 1.0, drafted=8, accepted=6, passes=2),  # differs at index 2
            req("b", ["p", "q"], 1.0, drafted=4, accepted=1, passes=1),
        ],
    )
    return [ar, sd]


def test_tokens_per_s_and_ratio_to_ar(results):
    ar, sd = summarize(results)
    assert ar.tokens_per_s == pytest.approx(6 / 4.0)
    assert sd.tokens_per_s == pytest.approx(6 / 2.0)
    assert ar.ratio_to_ar == pytest.approx(1.0)
    assert sd.ratio_to_ar == pytest.approx(2.0)


def test_acceptance_columns(results):
    ar, sd = summarize(results)
    assert ar.acceptance_rate is None  # nothing drafted
    assert ar.mean_acceptance_length == pytest.approx(1.0)
    assert (sd.num_draft_tokens, sd.num_accepted_tokens, sd.num_target_passes) == (12, 7, 3)
    assert sd.acceptance_rate == pytest.approx(7 / 12)
    assert sd.mean_acceptance_length == pytest.approx(6 / 3)


def test_identical_outputs_and_first_divergence_margin(results):
    ar, sd = summarize(results)
    assert ar.identical_to_ar is None and ar.divergences == []
    assert (sd.identical_to_ar, sd.compared_to_ar) == (1, 2)
    (d,) = sd.divergences
    assert (d.prompt_id, d.index, d.baseline_token, d.mode_token) == ("a", 2, "z", "Z")
    assert d.margin == pytest.approx(0.01)  # -0.5 - (-0.51): a near-tie


def test_no_ar_means_no_ratio_and_no_comparison(results):
    (sd,) = summarize(results[1:])
    assert sd.ratio_to_ar is None and sd.identical_to_ar is None
    assert sd.tokens_per_s == pytest.approx(3.0)


def test_missing_speculation_stats_give_dashes():
    s = summarize([ModeResult("sd", [req("a", ["x"], 1.0), req("b", ["y"], 1.0, 4, 2, 1)])])[0]
    assert s.acceptance_rate is None and s.mean_acceptance_length is None
    md = to_markdown([s])
    assert "| sd | tandem | 2 | 2 | 2.00 | 1.00 | - | - | - | - | - |" in md


def test_first_difference_cases():
    assert first_difference(["a", "b"], ["a", "b"]) is None
    assert first_difference(["a", "b"], ["a", "c"]) == 1
    assert first_difference(["a", "b", "c"], ["a", "b"]) == 2  # one stopped early (e.g. EOS)
    assert first_difference([], ["a"]) == 0


def test_top2_margin_cases():
    assert top2_margin([[-0.2, -1.7]], 0) == pytest.approx(1.5)
    assert top2_margin([[-1.7, -0.2]], 0) == pytest.approx(1.5)  # order-insensitive
    assert top2_margin([[-0.2]], 0) is None
    assert top2_margin(None, 0) is None
    assert top2_margin([[-0.2, -1.0]], 3) is None


def test_divergence_when_one_output_is_a_prefix():
    ar = ModeResult("ar", [req("a", ["x", "y", "z"], 1.0, top=[[-0.1, -2.0]] * 3)])
    sd = ModeResult("sd", [req("a", ["x", "y"], 1.0)])
    (d,) = summarize([ar, sd])[1].divergences
    assert d.index == 2 and d.baseline_token == "z" and d.mode_token is None
    assert d.margin == pytest.approx(1.9)


def test_markdown_and_json_render(results):
    summaries = summarize(results)
    md = to_markdown(summaries, {"max_tokens": 4})
    assert "| ar | tandem | 2 | 6 | 4.00 | 1.50 | 1.00x | - | - | 1.00 | - | - | - | - | - | - |" in md
    assert "| sd | tandem | 2 | 6 | 2.00 | 3.00 | 2.00x | - | 58.3% | 2.00 | - | - | - | - | - | 1/2 |" in md
    assert "Outputs that differ from ar" in md and "0.0100" in md and "'z'" in md
    data = json.loads(json.dumps(to_json(summaries, results, {"max_tokens": 4})))
    assert data["summary"][1]["identical_to_ar"] == 1
    assert data["results"][0]["requests"][0]["tokens"] == ["x", "y", "z", "w"]


def test_parse_chat_response_with_logprobs_and_speculation():
    response = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1}, {"token": "Hello", "logprob": -2.5}]},
                        {"token": " there", "logprob": -0.3, "top_logprobs": [{"token": " there", "logprob": -0.3}, {"token": "!", "logprob": -1.3}]},
                    ]
                },
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "speculation": {"num_draft_tokens": 4, "num_accepted_tokens": 1, "num_target_passes": 1},
    }
    r = parse_response(Prompt("c", "chat", "hello"), response, 0.5)
    _check_chat(r)
    # the same through the SDK's own type (unknown fields are kept as extras)
    from openai.types.chat import ChatCompletion

    sdk = ChatCompletion.model_validate({"id": "x", "object": "chat.completion", "created": 0, "model": "m", **response})
    _check_chat(parse_response(Prompt("c", "chat", "hello"), sdk, 0.5))


def _check_chat(r):
    assert r.text == "Hi there" and r.tokens == ["Hi", " there"]
    assert r.top_logprobs == [[-0.1, -2.5], [-0.3, -1.3]]
    assert (r.num_draft_tokens, r.num_accepted_tokens, r.num_target_passes) == (4, 1, 1)
    assert r.completion_tokens == 2 and r.finish_reason == "stop" and r.wall_s == 0.5


def test_parse_completion_response_with_logprobs():
    response = {
        "choices": [
            {
                "text": " 8, 10",
                "finish_reason": "length",
                "logprobs": {
                    "tokens": [" 8", ",", " 10"],
                    "token_logprobs": [-0.1, -0.01, -0.2],
                    "top_logprobs": [{" 8": -0.1, " 9": -3.0}, {",": -0.01, ".": -5.0}, {" 10": -0.2, " 12": -2.2}],
                },
            }
        ],
        "usage": {"completion_tokens": 3},
    }
    r = parse_response(Prompt("m", "completion", "2, 4, 6,"), response, 1.0)
    assert r.tokens == [" 8", ",", " 10"]
    assert top2_margin(r.top_logprobs, 2) == pytest.approx(2.0)
    assert r.num_target_passes is None  # no speculation field: ar on a server that sends none


def test_shipped_prompts_file_is_valid():
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert 12 <= len(prompts) <= 16
    assert len({p.id for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts} == {"chat", "completion"}
    assert len(load_prompts(DEFAULT_PROMPTS, limit=3)) == 3


def test_bad_prompts_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "x", "kind": "poem", "prompt": "hi"}\n')
    with pytest.raises(BenchError):
        load_prompts(path)
    path.write_text("not json\n")
    with pytest.raises(BenchError):
        load_prompts(path)


def test_worker_columns_from_counter_deltas():
    sd = ModeResult(
        "amusd",
        [req("a", ["x"] * 10, 2.0, 12, 9, 4)],
        counters={
            "verify_busy_s": 1.5, "draft_busy_s": 1.0, "rollbacks": 2, "stale_draft_tokens": 3, "verify_wait_s": 0.3
        },
    )
    s = summarize([sd])[0]
    assert s.verify_busy == pytest.approx(0.75) and s.draft_busy == pytest.approx(0.5)
    assert s.rollback_rate == pytest.approx(0.5)  # 2 rollbacks over 4 target passes
    assert s.verify_wait == pytest.approx(0.15)
    assert s.other_ms_per_pass == pytest.approx((2.0 - 1.5 - 0.3) / 4 * 1e3)  # 50 ms per pass
    assert "50.0" in to_markdown([s])
    assert "75%" in to_markdown([s]) and "50%" in to_markdown([s])
    assert summarize([ModeResult("ar", [req("a", ["x"], 1.0)])])[0].draft_busy is None


SETTINGS = Settings(
    config=None, dtype=None, port=8090, max_tokens=8, temperature=0.0, top_p=None, seed=None,
    num_draft_tokens=None, logprobs=True, startup_timeout_s=10, request_timeout_s=10,
)


def test_variants_parse_into_mode_and_settings():
    modes = ("ar", "sd", "amusd")
    run = Run.parse_variant("amusd-ra16=amusd speculation.max_run_ahead=16 speculation.num_draft_tokens=8", modes)
    assert run == Run("amusd-ra16", "amusd", ("speculation.max_run_ahead=16", "speculation.num_draft_tokens=8"))
    server = ServerProcess(run, SETTINGS, Path("unused.log"))
    assert server.command[server.command.index("--mode") + 1] == "amusd"
    assert server.command[-4:] == ["--set", "speculation.max_run_ahead=16", "--set", "speculation.num_draft_tokens=8"]
    for bad in ("amusd speculation.max_run_ahead=16", "x=warp", "x=amusd speculation.max_run_ahead"):
        with pytest.raises(BenchError):
            Run.parse_variant(bad, modes)


def peer_results(results):
    """ar and sd (Tandem) with two peer rows: plain (6 tokens in 3 s) and with a draft (6 in 4 s)."""
    plain = ModeResult("llama.cpp", [req("a", ["x", "y", "z", "w"], 2.0), req("b", ["p", "q"], 1.0)], peer=True)
    draft = ModeResult(
        "llama.cpp+draft n=3", [req("a", ["x", "y", "z", "w"], 3.0, 6, 3), req("b", ["p", "Q"], 1.0, 2, 1)], peer=True
    )
    return results + [plain, draft]


def test_peer_rows_get_ratios_to_ar_and_to_the_best_peer(results):
    ar, sd, plain, draft = summarize(peer_results(results))
    assert (ar.peer, sd.peer, plain.peer, draft.peer) == (False, False, True, True)
    assert plain.tokens_per_s == pytest.approx(2.0) and draft.tokens_per_s == pytest.approx(1.5)
    assert plain.ratio_to_ar == pytest.approx(2.0 / 1.5)  # peers are compared to Tandem's ar too
    # the best peer is the fastest peer row (plain), whichever order the peers ran in
    assert plain.ratio_to_best_peer == pytest.approx(1.0)
    assert draft.ratio_to_best_peer == pytest.approx(0.75)
    assert sd.ratio_to_best_peer == pytest.approx(3.0 / 2.0)
    assert ar.ratio_to_best_peer == pytest.approx(0.75)
    # peers' outputs are compared with ar's like any mode's
    assert (plain.identical_to_ar, draft.identical_to_ar) == (2, 1)
    assert draft.acceptance_rate == pytest.approx(4 / 8)  # from llama.cpp's own draft counts
    assert draft.mean_acceptance_length is None  # no target passes reported


def test_peer_rows_are_marked_and_worker_columns_are_dashes(results):
    summaries = summarize(peer_results(results))
    md = to_markdown(summaries)
    assert "| llama.cpp | peer | 2 | 6 | 3.00 | 2.00 | 1.33x | 1.00x | - | - | - | - | - | - | - | 2/2 |" in md
    assert "| llama.cpp+draft n=3 | peer | 2 | 6 | 4.00 | 1.50 | 1.00x | 0.75x | 50.0% | - | - | - | - | - | - | 1/2 |" in md
    assert "| sd | tandem | 2 | 6 | 2.00 | 3.00 | 2.00x | 1.50x |" in md
    assert "fastest peer row" in md and "llama.cpp's (2.00)" in md
    data = json.loads(json.dumps(to_json(summaries, peer_results(results))))
    assert data["best_peer"] == "llama.cpp"
    assert [row["peer"] for row in data["summary"]] == [False, False, True, True]
    assert data["results"][2]["peer"] is True


def test_no_peer_means_no_peer_ratio(results):
    assert all(s.ratio_to_best_peer is None for s in summarize(results))
    assert "fastest peer row" not in to_markdown(summarize(results))
    assert to_json(summarize(results), results)["best_peer"] is None


def test_parse_llama_server_chat_response():
    """llama-server's chat answer: logprobs in the chat form, draft counts in "timings", no "speculation"."""
    response = {
        "choices": [
            {
                "finish_reason": "length",
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "logprobs": {
                    "content": [
                        {"id": 13048, "token": "Hi", "bytes": [72, 105], "logprob": -0.1,
                         "top_logprobs": [{"id": 13048, "token": "Hi", "bytes": [72, 105], "logprob": -0.1},
                                          {"id": 9707, "token": "Hello", "bytes": [72], "logprob": -2.5}]},
                        {"id": 1052, "token": " there", "bytes": [32], "logprob": -0.3,
                         "top_logprobs": [{"id": 1052, "token": " there", "bytes": [32], "logprob": -0.3},
                                          {"id": 0, "token": "!", "bytes": [33], "logprob": -1.3}]},
                    ]
                },
            }
        ],
        "usage": {"completion_tokens": 2, "prompt_tokens": 5, "total_tokens": 7},
        "timings": {"prompt_n": 5, "predicted_n": 2, "predicted_ms": 100.0, "draft_n": 4, "draft_n_accepted": 1},
    }
    from openai.types.chat import ChatCompletion

    for raw in (response, ChatCompletion.model_validate({"id": "x", "object": "chat.completion", "created": 0,
                                                          "model": "t.gguf", **response})):
        r = parse_response(Prompt("c", "chat", "hello"), raw, 0.5)
        assert r.text == "Hi there" and r.tokens == ["Hi", " there"]
        assert r.top_logprobs == [[-0.1, -2.5], [-0.3, -1.3]]
        assert (r.num_draft_tokens, r.num_accepted_tokens, r.num_target_passes) == (4, 1, None)


def test_parse_llama_server_completion_response_and_absent_logprobs():
    """llama-server's /v1/completions sends logprobs in the chat form; a server may send none at all."""
    response = {
        "choices": [{"text": " 8", "index": 0, "finish_reason": "length", "logprobs": {"content": [
            {"id": 1, "token": " 8", "logprob": -0.1, "top_logprobs": [{"token": " 8", "logprob": -0.1},
                                                                      {"token": " 9", "logprob": -3.0}]}]}}],
        "usage": {"completion_tokens": 1},
        "timings": {"predicted_n": 1},  # plain llama.cpp: no draft counts
    }
    r = parse_response(Prompt("m", "completion", "2, 4, 6,"), response, 1.0)
    assert r.tokens == [" 8"] and top2_margin(r.top_logprobs, 0) == pytest.approx(2.9)
    assert r.num_draft_tokens is None and r.num_accepted_tokens is None
    bare = {"choices": [{"message": {"content": "ok"}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 1}}
    r = parse_response(Prompt("c", "chat", "hi"), bare, 1.0)
    assert (r.text, r.tokens, r.top_logprobs, r.completion_tokens) == ("ok", None, None, 1)


def test_scrape_counters_reads_the_model_labelled_series(smollm_tokenizer):
    """The bench's worker counters come from /metrics, whose series carry model_name:
    a match on the exact label set would read 0 for every one of them."""
    from urllib.parse import urlparse

    from bench.harness import WORKER_COUNTERS, scrape_counters
    from protocol.messages import WorkerStats
    from server.app import create_app
    from server.serving import AppSettings
    from tests.api.fake_backend import FakeBackend
    from tests.helpers import UvicornThread

    backend = FakeBackend(smollm_tokenizer)
    backend.worker_stats = {
        "verify": WorkerStats("verify", 2.0, 10.0, stale_drafts=3, draft_wait_s=0.5),
        "draft": WorkerStats("draft", 4.0, 10.0, rollbacks=7),
    }
    settings = AppSettings(model_name="m", max_model_len=64, eos_token_ids=(0,))
    with UvicornThread(create_app(backend, smollm_tokenizer, settings)) as server:
        counters = scrape_counters(urlparse(server.url).port)
    assert set(counters) == set(WORKER_COUNTERS)
    assert counters == {"verify_busy_s": 2.0, "draft_busy_s": 4.0, "rollbacks": 7, "stale_draft_tokens": 3,
                        "verify_wait_s": 0.5}


def test_rounds_pool_and_give_ratios_within_each_round(results):
    """bench --rounds: round 2 runs twice as slow for every mode (the machine drifted). Catches a
    ratio taken across rounds (sd's round 2 against ar's round 1), a round's requests or counters
    dropped from the pooled row, or rows out of the first round's order."""
    ar, sd = results
    sd.counters = {"rollbacks": 3.0}

    def slower(r: ModeResult) -> ModeResult:
        return ModeResult(r.mode, [req(q.prompt_id, q.tokens, q.wall_s * 2) for q in r.requests], None, dict(r.counters))

    rounds = [[ar, sd], [slower(sd), slower(ar)]]
    rows = round_rows(rounds)
    assert [r.mode for r in rows] == ["ar", "sd"]
    assert rows[1].tokens_per_s == pytest.approx([3.0, 1.5])
    assert rows[1].ratios_to_ar == pytest.approx([2.0, 2.0]) and rows[1].median_ratio == pytest.approx(2.0)
    merged = pooled(rounds)
    assert [r.mode for r in merged] == ["ar", "sd"]
    assert len(merged[1].requests) == 4 and merged[1].counters == {"rollbacks": 6.0}
    table = rounds_markdown(rows)
    assert "| sd | 3.00 | 1.50 | 2.00x | 2.00x | 2.00x |" in table
