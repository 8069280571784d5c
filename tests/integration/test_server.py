"""Real processes on loopback: launcher, verify and draft workers over ZeroMQ,
uvicorn, and the OpenAI SDK as the client. Tiny random model, float32."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import TINY_EASYSPEC_SECTIONS, launch_server, process_alive, tiny_pair, wait_until, write_config

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "List three colors:",
    "Once upon a time, in a land far away,",
    "1 + 1 =",
    "Summarize: the cat sat on the mat.",
]


@pytest.fixture(scope="module")
def ar_server(tiny_config):
    with launch_server(tiny_config, mode="ar") as server:
        yield server


@pytest.fixture(scope="module")
def sd_server(tiny_config):
    with launch_server(tiny_config, mode="sd") as server:
        yield server


@pytest.fixture(scope="module")
def amusd_server(tiny_config):
    with launch_server(tiny_config, mode="amusd") as server:
        yield server


def easyspec_config(path, tiny_target_dir):
    return write_config(
        path,
        target={"path": str(tiny_target_dir), "dtype": "float32"},
        draft={"path": str(tiny_target_dir), "dtype": "float32"},
        **TINY_EASYSPEC_SECTIONS,
    )


@pytest.fixture(scope="module")
def easyspec_server(tmp_path_factory, tiny_target_dir):
    config = easyspec_config(tmp_path_factory.mktemp("easyspec") / "easyspec.yaml", tiny_target_dir)
    with launch_server(config, mode="easyspec") as server:
        yield server


@pytest.fixture(params=["sd", "amusd", "easyspec"])
def spec_server(request):
    """Each speculative mode's server in turn."""
    return request.getfixturevalue(f"{request.param}_server")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def complete(server, prompt, max_tokens=32, **kwargs):
    return client(server).completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_adaptive_speculation_through_the_server(tiny_config, ar_server, mode):
    """speculation.adaptive reaches the verify worker through the config: six concurrent
    greedy requests give ar's text, each response's drafts are what its rounds used
    (the round histogram's sum and count move by the responses' drafts and passes),
    and a seeded sampled request gives the same text twice."""
    with launch_server(tiny_config, "--set", "speculation.adaptive=true", mode=mode) as server:
        before = server.metrics()
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: complete(server, p, max_tokens=24), PROMPTS))
        after = server.metrics()
        for prompt, reply in zip(PROMPTS, got):
            assert reply.choices[0].text == complete(ar_server, prompt, max_tokens=24).choices[0].text, prompt
        spec = [reply.model_extra["speculation"] for reply in got]

        def delta(name):
            return after[(name, ())] - before.get((name, ()), 0.0)

        assert delta("tandem:spec_decode_round_draft_tokens_sum") == sum(s["num_draft_tokens"] for s in spec) > 0
        assert delta("tandem:spec_decode_round_draft_tokens_count") == sum(s["num_target_passes"] for s in spec)
        sampled = [
            client(server).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=1.0, seed=11)
            .choices[0].text
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]


def test_bench_load_sets_each_requests_speculation(sd_server, tmp_path):
    """`python -m bench.load --num-draft-tokens 0` sends every request with speculation off:
    the server verifies rounds and counts no drafts (catches the flag not reaching the
    body, which would make a "no speculation" load run measure speculation)."""
    from bench import load

    before = sd_server.metrics()
    args = ["--url", sd_server.url, "--clients", "2", "--requests", "4", "--max-tokens", "8",
            "--num-draft-tokens", "0", "--json", str(tmp_path / "load.json")]
    assert load.main(args) == 0
    after = sd_server.metrics()

    def delta(name):
        return after.get((name, ()), 0) - before.get((name, ()), 0)

    assert delta("tandem:spec_decode_round_draft_tokens_count") > 0  # rounds were verified
    assert delta("tandem:spec_decode_round_draft_tokens_sum") == 0


def test_speculative_output_equals_ar_output(ar_server, spec_server):
    for prompt in PROMPTS:
        ar, sd = complete(ar_server, prompt), complete(spec_server, prompt)
        assert sd.choices[0].text == ar.choices[0].text, prompt
        assert sd.usage.completion_tokens == ar.usage.completion_tokens
    stats = sd.model_extra["speculation"]
    assert stats["num_draft_tokens"] > 0
    assert 0 < stats["num_target_passes"] <= sd.usage.completion_tokens


def test_per_request_speculation_control(sd_server):
    """`speculation: {num_draft_tokens: n}` in the body (the SDK's extra_body) caps this
    request's drafts per round: 0 gives the same text with no drafts counted, 2 at most
    two a pass. Catches the field not reaching the verifier, or a cap that changes text."""
    prompt = PROMPTS[3]
    default = complete(sd_server, prompt)
    off = complete(sd_server, prompt, extra_body={"speculation": {"num_draft_tokens": 0}})
    two = complete(sd_server, prompt, extra_body={"speculation": {"num_draft_tokens": 2}})
    assert off.choices[0].text == two.choices[0].text == default.choices[0].text
    assert default.model_extra["speculation"]["num_draft_tokens"] > 0
    assert off.model_extra["speculation"]["num_draft_tokens"] == 0
    assert off.model_extra["speculation"]["num_target_passes"] == off.usage.completion_tokens
    stats = two.model_extra["speculation"]
    assert 0 < stats["num_draft_tokens"] <= 2 * stats["num_target_passes"]
    with pytest.raises(openai.BadRequestError):
        complete(sd_server, prompt, extra_body={"speculation": {"num_draft_tokens": -1}})


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="borrowing needs a core for each worker")
def test_amusd_target_borrows_the_idle_drafts_core(tmp_path, tiny_target_dir, ar_server):
    """placement.amusd.borrow_draft_cores: steps where no request drafts run the target on the
    draft's core too (tandem:verify_wide_steps_total counts them), again once a request that
    drafted has ended (the draft said it has nothing left to do: DraftIdle), and text stays
    ar's, alone and beside a request that drafts. Catches the placement not reaching the
    verify worker, borrowing while a request drafts, a draft that never says it idles, and a
    wide pass that changes the tokens."""
    cores = {"target": {"device": "cpu", "cores": [1], "threads": 1}, "draft": {"device": "cpu", "cores": [0], "threads": 1}}
    # borrow whatever the start-up probe times: the tiny model's millisecond pass on 2 cores took
    # 0.7x to 1.3x one on 1 here, and borrowing was turned down in 1 run of 3
    config = write_config(tmp_path / "borrow.yaml", **tiny_pair(tiny_target_dir),
                          placement={"amusd": {**cores, "borrow_draft_cores": True, "borrow_max_share": 100.0}})
    off = {"speculation": {"num_draft_tokens": 0}}
    with launch_server(config, mode="amusd") as server:
        alone = complete(server, PROMPTS[0], extra_body=off)
        assert alone.model_extra["speculation"]["num_draft_tokens"] == 0
        assert wait_until(lambda: server.metric("tandem:verify_wide_steps_total") >= alone.usage.completion_tokens - 1,
                          timeout_s=10)
        wide_before = server.metric("tandem:verify_wide_steps_total")
        drafting = complete(server, PROMPTS[1])
        time.sleep(1.2)  # the workers report every ~0.5 s
        # it drafted: no step borrowed but, maybe, its last (one token left, no room for a draft)
        assert server.metric("tandem:verify_wide_steps_total") - wide_before <= 1
        assert drafting.model_extra["speculation"]["num_draft_tokens"] > 0
        wide_before = server.metric("tandem:verify_wide_steps_total")
        again = complete(server, PROMPTS[0], extra_body=off)
        assert wait_until(lambda: server.metric("tandem:verify_wide_steps_total") - wide_before
                          >= again.usage.completion_tokens - 1, timeout_s=10)
        with ThreadPoolExecutor(2) as pool:
            mixed = list(pool.map(lambda args: complete(server, args[0], **args[1]),
                                  [(PROMPTS[2], {"extra_body": off}), (PROMPTS[3], {})]))
    for prompt, reply in zip(PROMPTS, [alone, drafting, *mixed]):
        assert reply.choices[0].text == complete(ar_server, prompt).choices[0].text, prompt


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_a_disagreeing_draft_still_equals_ar(tmp_path, ar_server, tiny_target_dir, tiny_stranger_dir, mode):
    config = write_config(
        tmp_path / "stranger.yaml",
        target={"path": str(tiny_target_dir), "dtype": "float32"},
        draft={"path": str(tiny_stranger_dir), "dtype": "float32"},
    )
    with launch_server(config, mode=mode) as server:
        for prompt in PROMPTS[:3]:
            assert complete(server, prompt).choices[0].text == complete(ar_server, prompt).choices[0].text
        assert server.metric("tandem:spec_decode_num_draft_tokens_total") > 0


def test_chat_and_streaming_equal_non_streaming(spec_server):
    sd_server = spec_server
    sdk = client(sd_server)
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    parts = sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in parts if chunk.choices)
    assert streamed == whole.choices[0].message.content
    text = "".join(
        c.choices[0].text for c in client(sd_server).completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=32, temperature=0, stream=True
        )
    )
    assert text == complete(sd_server, PROMPTS[1]).choices[0].text


def test_concurrent_requests_do_not_mix(spec_server):
    sd_server = spec_server
    solo = {p: complete(sd_server, p, max_tokens=24).choices[0].text for p in PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(sd_server, p, max_tokens=24).choices[0].text, PROMPTS * 2))
    assert together == [solo[p] for p in PROMPTS * 2]


def test_seeded_sampling_is_reproducible_through_the_server(ar_server, spec_server):
    def sample(seed, temperature=1.0, server=spec_server, **extra):
        return client(server).completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=temperature, top_p=0.9, seed=seed,
            extra_body=extra,
        ).choices[0].text

    assert sample(7) == sample(7)
    # each token is the winner of its position's race over the target's p: the same text as
    # the target alone (catches a draft's proposal, or a round's number of drafts, changing it)
    assert sample(7) == sample(7, server=ar_server) and sample(9) == sample(9, server=ar_server)
    # the seed and the temperature are used: another seed, or greedy, gives another text
    assert sample(8) != sample(7)
    assert sample(7, temperature=0) != sample(7)
    # the sampled path follows the target: with top_k=1 every draw is the target's argmax
    assert sample(7, top_k=1) == sample(8, top_k=1) == sample(0, temperature=0, server=ar_server)


def test_spec_decode_metrics_move(sd_server):
    before = sd_server.metric("tandem:spec_decode_num_draft_tokens_total")
    complete(sd_server, PROMPTS[3])
    after = sd_server.metrics()
    assert after[("tandem:spec_decode_num_draft_tokens_total", ())] > before
    assert after[("tandem:spec_decode_num_accepted_tokens_total", ())] > 0
    assert after[("tandem:spec_decode_num_accepted_tokens_per_pos_total", (("position", "0"),))] > 0


def test_disconnected_stream_is_aborted(spec_server):
    sd_server = spec_server
    expected = complete(sd_server, PROMPTS[4], max_tokens=4)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{sd_server.base_url}/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one chunk, then hang up
    assert wait_until(lambda: sd_server.metric("tandem:num_requests_running") == 0, timeout_s=10)
    # the server is still fine
    after = complete(sd_server, PROMPTS[4], max_tokens=4)
    assert after.choices[0].text == expected.choices[0].text and after.usage.completion_tokens == 4


def test_sigterm_stops_every_process(tiny_config):
    with launch_server(tiny_config, mode="sd") as server:
        pids = server.worker_pids()
        assert len(pids) == 2
        commands = [open(f"/proc/{pid}/cmdline").read() for pid in pids]
        assert any("workers.verify" in c for c in commands) and any("workers.draft" in c for c in commands)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0  # a clean exit (wait raises if it hangs)
    for pid in pids:
        assert not process_alive(pid)


def test_mismatched_tokenizers_are_refused(tmp_path, tiny_target_dir):
    from tests.tiny_model import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "no-tokenizer", vocab_size=300)
    config = write_config(
        tmp_path / "bad.yaml",
        target={"path": str(tiny_target_dir), "dtype": "float32"},
        draft={"path": str(other), "dtype": "float32"},
    )
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--config", str(config), "--port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "cannot be paired" in result.stderr or "tokenizer" in result.stderr.lower()


@pytest.mark.parametrize("mode", ["easyspec", "amusd+easyspec"])
def test_easyspec_modes_equal_ar(request, tmp_path, ar_server, tiny_target_dir, mode):
    """The draft's layers run in parallel groups over 2 ranks (fuzzy KV, calibrated);
    the output is still the target's."""
    if mode == "easyspec":
        launched = contextlib.nullcontext(request.getfixturevalue("easyspec_server"))
    else:
        launched = launch_server(easyspec_config(tmp_path / "easyspec.yaml", tiny_target_dir), mode=mode)
    with launched as server:
        assert len(server.worker_pids()) == 2  # verify, draft (its rank 1 is the draft's child)
        for prompt in PROMPTS[:3]:
            assert complete(server, prompt).choices[0].text == complete(ar_server, prompt).choices[0].text
        assert server.metric("tandem:spec_decode_num_draft_tokens_total") > 0
        # the draft reports its counters every ~0.5 s: a fresh server may not have yet
        assert wait_until(lambda: server.metric("tandem:easyspec_fuzzy_passes_total") > 0, timeout_s=10)


def test_amusd_worker_metrics_show_both_devices_at_work(amusd_server):
    """The series a user reads to see whether draft and verify overlap."""
    for prompt in PROMPTS[:3]:
        complete(amusd_server, prompt, max_tokens=48)
    time.sleep(1.2)  # workers report their counters every ~0.5 s
    m = amusd_server.metrics()

    def value(name, **labels):
        return m.get((name, tuple(sorted(labels.items()))))

    for role in ("verify", "draft"):
        assert value("tandem:worker_busy_seconds_total", role=role) > 0, role
        assert 0 < value("tandem:worker_busy_fraction", role=role) <= 1, role
    assert value("tandem:spec_decode_drafted_tokens_total") > 0
    # the same tiny network drafts (int8) and verifies: few rollbacks and stale drafts, but the
    # series are exported, counting whole tokens (and cannot exceed what was drafted)
    drafted = value("tandem:spec_decode_drafted_tokens_total")
    for name in ("tandem:spec_decode_rollbacks_total", "tandem:spec_decode_stale_draft_tokens_total"):
        assert value(name) is not None and 0 <= value(name) <= drafted and value(name) == int(value(name)), name
    assert value("tandem:verify_draft_wait_seconds_total") >= 0
    assert value("tandem:spec_decode_draft_run_ahead_count") > 0


def _maps_torch(pid: int) -> bool:
    """Whether process `pid` has torch's shared library mapped (so it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_http_process_never_loads_torch(sd_server):
    """Catches an import in the HTTP process (launcher, app, tokenizer loading, checkpoint
    resolution) that drags in torch: hundreds of MB and seconds of start for a process
    that only handles text. The workers, which run the models, do map it (so the check can see it)."""
    workers = sd_server.worker_pids()
    assert workers and all(_maps_torch(pid) for pid in workers)
    assert not _maps_torch(sd_server.process.pid)
