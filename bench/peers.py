"""Peer rows: other OpenAI-compatible servers measured in the same bench run.

A peer is either a server the bench starts for its row (llama.cpp's
``llama-server``: see bench/llamacpp.py) on the bench's port, or one already
running (``--external LABEL=URL``). Either way the prompts go through the same
``Client`` (the OpenAI SDK), warm-up and timing as Tandem's modes, and the row
comes back as a ``ModeResult`` with ``peer=True``: no worker counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from bench.harness import BenchError, Client, Prompt, Run, ServerProcess, Settings, log_path, measure, warm_up
from bench.report import ModeResult

EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class Peer:
    """One peer row: a command to start (listening on the bench's port) or the URL of a running server."""

    label: str
    command: tuple[str, ...] = ()
    url: str | None = None


def api_base(url: str) -> str:
    """A server's address as the OpenAI SDK's base_url: 'http://host:port' -> 'http://host:port/v1'."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def parse_external(text: str) -> Peer:
    """'LABEL=URL' (URL: http(s)://host:port, with or without /v1) -> a peer already running."""
    label, sep, url = text.partition("=")
    label, url = label.strip(), url.strip()
    parts = urlsplit(url)
    if not sep or not label or parts.scheme not in ("http", "https") or not parts.hostname:
        raise BenchError(f"--external must look like LABEL=http://HOST:PORT[/v1]; got {text!r}")
    return Peer(label=label, url=api_base(url))


# ---------------------------------------------------------------- model files for a peer


def resolve_gguf(spec: str) -> Path:
    """A config's model path as a GGUF file: a .gguf path as is, embedded:NAME through the embedded table."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        try:
            from workers.model.embedded import embedded_gguf  # the real pair (assembled from its chunks)
        except ImportError:
            from workers.model.checkpoints import embedded_gguf  # older tree: the SmolLM2 default only
        try:
            return Path(embedded_gguf(name))
        except (ValueError, OSError, KeyError) as exc:
            raise BenchError(f"{spec}: {exc}") from None
    path = Path(spec).expanduser()
    if path.suffix.lower() != ".gguf":
        raise BenchError(f"{spec}: a peer needs a GGUF file; pass --peer-target/--peer-draft PATH.gguf")
    if not path.is_file():
        raise BenchError(f"{spec}: no such file")
    return path.resolve()


def peer_models(config: str | None, target: str | None, draft: str | None) -> tuple[Path, Path | None]:
    """The target and draft GGUF files for a peer: the overrides, else the config's target.path / draft.path."""
    if target is None or draft is None:
        from configs.loader import ConfigError, load_config

        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise BenchError(str(exc)) from None
        target = target or cfg.target.path
        draft = draft or cfg.draft.path
    return resolve_gguf(target), resolve_gguf(draft) if draft else None


# ---------------------------------------------------------------- running a peer row


class PeerProcess(ServerProcess):
    """A peer's server process, started for its row: same start (own session, log, /health), same stop."""

    def __init__(self, peer: Peer, settings: Settings, log: Path, say: Callable[[str], None] = print):
        super().__init__(Run(peer.label, "peer"), settings, log, say)
        self._command = list(peer.command)

    @property
    def command(self) -> list[str]:
        return self._command


def run_peer(
    peer: Peer, prompts: list[Prompt], settings: Settings, log_dir: Path, say: Callable[[str], None] = print
) -> ModeResult:
    """The prompts through a peer, exactly as through a Tandem mode (warm-up, then each timed)."""
    if peer.url is not None:
        try:
            client = Client(settings, base_url=peer.url)
        except Exception as exc:  # the SDK's connection errors, or a server that lists no model
            raise BenchError(f"[{peer.label}] cannot list models at {peer.url}: {exc}") from exc
        say(f"[{peer.label}] external server at {peer.url}, model {client.model}")
        warm_up(peer.label, client, prompts, settings, say)
        results = measure(peer.label, client, prompts, lambda: True, None, say)
        return ModeResult(mode=peer.label, requests=results, peer=True)
    server = PeerProcess(peer, settings, log_path(log_dir, "peer", peer.label), say)
    with server:
        client = Client(settings)
        warm_up(peer.label, client, prompts, settings, say)
        results = measure(peer.label, client, prompts, server.alive, server.log_path, say)
    return ModeResult(mode=peer.label, requests=results, startup_s=server.startup_s, peer=True)
