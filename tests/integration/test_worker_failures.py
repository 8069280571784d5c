"""Workers die (kill -9): requests end cleanly or go on target-only, the
launcher restarts the worker, service resumes; SIGTERM drains gracefully."""

from __future__ import annotations

import os
import signal
import threading

import httpx
import openai
import pytest

from tests.helpers import TINY_EASYSPEC_SECTIONS, child_pids, launch_server, process_alive, tiny_pair, wait_until, write_config

PROMPT = "Once upon a time, in a land far away,"


def worker_pid(server, role: str) -> int:
    for pid in server.worker_pids():
        with open(f"/proc/{pid}/cmdline") as f:
            if f"workers.{role}" in f.read():
                return pid
    raise LookupError(role)


def health(server) -> int:
    try:
        return httpx.get(f"{server.url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return -1


def complete(server, max_tokens=24, prompt=PROMPT):
    sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    return sdk.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)


@pytest.fixture(scope="module")
def restart_config(tmp_path_factory, tiny_target_dir):
    return write_config(
        tmp_path_factory.mktemp("restart") / "restart.yaml",
        **tiny_pair(tiny_target_dir),
        server={"restart_delay_s": 0.5, "shutdown_grace_s": 20},
        **TINY_EASYSPEC_SECTIONS,  # used by easyspec only: its rank 1 is a child of the draft worker
    )


@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_dead_verify_worker_fails_requests_then_is_restarted(restart_config, mode):
    with launch_server(restart_config, mode=mode) as server:
        expected = complete(server).choices[0].text
        old = worker_pid(server, "verify")
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            os.kill(old, signal.SIGKILL)
            rest = list(lines)  # the stream must end, not hang
        assert any('"error"' in line and "exited" in line for line in rest)
        assert any("[DONE]" in line for line in rest)
        status = health(server)  # down until the new verify worker is ready, never healthy with a dead one
        assert status == 503 or (status == 200 and worker_pid(server, "verify") != old), status
        assert wait_until(lambda: health(server) == 200)
        assert worker_pid(server, "verify") != old
        assert complete(server).choices[0].text == expected  # service resumed, same output
        assert server.metric("tandem:worker_restarts_total", role="verify") == 1


@pytest.mark.parametrize("mode", ["amusd", "easyspec"])
def test_dead_draft_worker_falls_back_to_target_only_then_resumes(restart_config, mode):
    with launch_server(restart_config, mode=mode) as server:
        expected = complete(server, max_tokens=48).choices[0].text
        old = worker_pid(server, "draft")
        ranks = child_pids(old)  # easyspec: rank 1 (and multiprocessing's resource tracker)
        assert bool(ranks) == (mode == "easyspec")
        results = []
        thread = threading.Thread(target=lambda: results.append(complete(server, max_tokens=48)))
        thread.start()
        os.kill(old, signal.SIGKILL)
        thread.join(120)
        assert results and results[0].choices[0].text == expected  # lossless without the draft
        assert health(server) == 200  # the target alone still serves
        assert wait_until(lambda: server.metric("tandem:worker_restarts_total", role="draft") == 1)
        new = worker_pid(server, "draft")
        assert new != old
        assert wait_until(lambda: not any(process_alive(pid) for pid in ranks), timeout_s=15)  # nothing orphaned

        def speculating():
            before = server.metric("tandem:spec_decode_num_draft_tokens_total")
            assert complete(server).choices[0].text == complete(server).choices[0].text
            return server.metric("tandem:spec_decode_num_draft_tokens_total") > before

        assert wait_until(speculating, timeout_s=60, interval_s=0.5)  # speculation resumed


def test_sigterm_lets_running_requests_finish(restart_config):
    with launch_server(restart_config, mode="sd") as server:
        pids = server.worker_pids()
        results = []
        thread = threading.Thread(target=lambda: results.append(complete(server, max_tokens=200)))
        thread.start()
        assert wait_until(lambda: server.metric("tandem:num_requests_running") == 1, timeout_s=30, interval_s=0.05)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert results, "the running request was cut off"
        assert results[0].choices[0].finish_reason == "length"
        assert results[0].usage.completion_tokens == 200
        assert server.process.wait(30) == 0  # a clean exit (wait raises if it hangs)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/health", timeout=2)
    for pid in pids:
        assert not process_alive(pid)


def test_killed_launcher_leaves_no_worker(restart_config):
    """Catches: workers (and easyspec's ranks under the draft worker) that
    outlive a launcher killed with SIGKILL, which cannot stop them itself: they
    must die with it through PR_SET_PDEATHSIG (workers.shell.become_worker)."""
    with launch_server(restart_config, mode="easyspec") as server:
        workers = server.worker_pids()
        everything = workers + [pid for worker in workers for pid in child_pids(worker)]
        assert len(everything) > len(workers) >= 2  # verify, draft, and the draft's rank 1
        server.process.kill()
        server.process.wait(10)
        assert wait_until(lambda: not any(process_alive(pid) for pid in everything), timeout_s=20), [
            pid for pid in everything if process_alive(pid)
        ]
