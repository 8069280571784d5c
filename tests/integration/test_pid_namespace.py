"""The launcher as PID 1, as in a container: `tandem serve` under
`unshare --pid --fork --mount-proc` comes up, serves through the OpenAI SDK,
and on SIGTERM to its PID 1 (what `docker stop` sends) stops with nothing left."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import openai
import pytest

from tests.helpers import REPO, RunningServer, child_pids, free_port, process_alive, wait_healthy, wait_until

PROMPT = "Once upon a time, in a land far away,"


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        out += children
        todo += children
    return out


def namespace_pid(pid: int) -> int:
    """The pid as seen inside its innermost PID namespace (NSpid's last field)."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("NSpid:"))
    return int(line.split()[-1])


def processes_in(pid_ns: str) -> list[int]:
    """Every live process (seen from here) whose PID namespace is pid_ns."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pid_ns and process_alive(int(entry)):
                    out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                pass
    return out


def test_launcher_as_pid_1_serves_and_stops_clean(tiny_config):
    """Catches: workers taking a launcher that is PID 1 (a container's entry
    point) for init and exiting as orphans at start (`getppid() == 1`), so the
    server never becomes healthy; and a SIGTERM to PID 1 that does not stop the
    launcher and its workers cleanly (exit code 0, no process of the namespace left)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("`unshare` (util-linux) is not installed: this test needs it to start a PID namespace")
    port = free_port()
    command = [
        unshare, "--pid", "--fork", "--mount-proc",
        "--kill-child",  # if unshare is killed (our clean-up below), the whole namespace goes with it
        sys.executable, "-m", "server.cli", "serve", "--config", str(tiny_config), "--port", str(port), "--mode", "sd",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_until(lambda: process.poll() is not None or child_pids(process.pid), timeout_s=30)
        assert process.poll() is None, f"unshare exited with code {process.returncode}: can this user unshare?"
        (launcher,) = child_pids(process.pid)
        assert namespace_pid(launcher) == 1, "the launcher is not PID 1 of a new namespace"
        pid_ns = os.readlink(f"/proc/{launcher}/ns/pid")
        assert pid_ns != os.readlink("/proc/self/ns/pid")

        wait_healthy(RunningServer(process, port), timeout_s=120)
        workers = child_pids(launcher)
        roles = set()
        for pid in workers:
            with open(f"/proc/{pid}/cmdline") as f:
                argv = f.read().split("\0")
            roles |= {role for role in ("verify", "draft") if f"workers.{role}" in argv}
        assert roles == {"verify", "draft"}, f"workers under PID 1: {workers}"

        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        result = sdk.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0)
        assert result.usage.completion_tokens == 16
        assert result.choices[0].finish_reason == "length"

        inside = processes_in(pid_ns)
        assert set(workers) <= set(inside) and launcher in inside
        # `docker stop`: SIGTERM to PID 1 (unshare itself blocks SIGTERM and would not pass it on)
        os.kill(launcher, signal.SIGTERM)
        assert process.wait(60) == 0, "the launcher did not stop cleanly on SIGTERM"
        assert wait_until(lambda: not processes_in(pid_ns), timeout_s=10), f"left running: {processes_in(pid_ns)}"
        assert not any(process_alive(pid) for pid in inside + descendants(launcher))
    finally:
        if process.poll() is None:
            process.kill()  # --kill-child: SIGKILL to PID 1 ends the namespace
            process.wait(30)


@pytest.mark.parametrize("parent_is_launcher", [True, False])
def test_worker_exits_at_start_when_its_parent_is_not_the_launcher(parent_is_launcher):
    """Catches: a worker that stays up although the launcher that started it
    died before PR_SET_PDEATHSIG was set (its parent is then no longer the pid
    the launcher gave it), and one that exits although its parent is the
    launcher (the PID-1 bug, in its general form: the check must be against the
    launcher's pid, not a fixed one)."""
    launcher = os.getpid() if parent_is_launcher else os.getppid()  # the real parent is this process
    code = "from workers.shell import become_worker; become_worker('verify'); print('up')"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "TANDEM_LAUNCHER_PID": str(launcher)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if parent_is_launcher:
        assert (result.returncode, result.stdout) == (0, "up\n"), result.stderr
    else:
        assert result.returncode == 1 and "up" not in result.stdout, result.stderr
