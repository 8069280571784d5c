"""A network namespace joined to this one by a veth pair: another host, as far
as TCP is concerned (own interfaces, own loopback, own ports), on this machine.

Needs root and iproute2 (`ip`). Names carry this process's pid, so runs at once
do not collide, and a run that died without cleaning up (SIGKILL) is cleaned
up by the next one: namespaces and veths named after a dead pid are removed.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

PREFIX = "tdm"  # tdm<pid>n<k> (namespace), tdm<pid>h<k> (veth, host side): at most 15 characters


def missing_requirement() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return f"not root (euid {os.geteuid()}): `ip netns add` and veth pairs need CAP_NET_ADMIN"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass(frozen=True)
class Namespace:
    name: str
    host_veth: str
    host_ip: str  # this namespace's end of the veth pair
    ns_ip: str  # the other namespace's end

    def command(self, *argv: str) -> list[str]:
        """argv run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.name, check=False).stdout
        return [int(pid) for pid in out.split()]


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def remove_stale() -> None:
    """Remove namespaces and veths left by test runs whose process is gone."""
    names = re.findall(rf"^({PREFIX}(\d+)n\d+)", _ip("netns", "list", check=False).stdout, re.M)
    for name, pid in names:
        if not _alive(int(pid)):
            _delete(name, None)
    for veth, pid in re.findall(rf"^\d+: ({PREFIX}(\d+)h\d+)[@:]", _ip("-o", "link", "show", check=False).stdout, re.M):
        if not _alive(int(pid)):
            _ip("link", "del", veth, check=False)


def _delete(name: str, host_veth: str | None) -> None:
    for pid in Namespace(name, "", "", "").pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "del", name, check=False)  # takes its veth end, and with it the pair
    if host_veth:
        _ip("link", "del", host_veth, check=False)


_count = 0


@contextlib.contextmanager
def network_namespace():
    """A fresh namespace with a veth pair to this one (a random 10.213.x.y/30);
    removed on exit, with every process still in it killed, whatever happened."""
    global _count
    remove_stale()
    _count += 1
    name, host_veth, ns_veth = (f"{PREFIX}{os.getpid()}{kind}{_count}" for kind in "nhp")
    block = random.Random().randrange(0, 1 << 14) * 4  # a /30 in 10.213.0.0/16
    host_ip, ns_ip = (f"10.213.{(block + i) >> 8}.{(block + i) & 255}" for i in (1, 2))
    try:
        _ip("netns", "add", name)
        _ip("link", "add", host_veth, "type", "veth", "peer", "name", ns_veth)
        _ip("link", "set", ns_veth, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_veth)
        _ip("link", "set", host_veth, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_veth)
        _ip("-n", name, "link", "set", ns_veth, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_veth, host_ip, ns_ip)
    finally:
        _delete(name, host_veth)
