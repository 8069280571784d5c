"""`tandem serve`: the one command that starts the server and its workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from configs.loader import DEFAULT_CONFIG, MODES, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: speculative decoding server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the OpenAI-compatible server and its workers")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    serve.add_argument("--host", help="bind address (config default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (config default: 8000)")
    serve.add_argument("--mode", choices=MODES, help="speculation mode (config: speculation.mode)")
    serve.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype of both models")
    serve.add_argument("--num-draft-tokens", type=int, help="draft tokens per round (config: speculation.num_draft_tokens)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(
            args.config,
            server__host=args.host,
            server__port=args.port,
            speculation__mode=args.mode,
            speculation__num_draft_tokens=args.num_draft_tokens,
            target__dtype=args.dtype,
            draft__dtype=args.dtype,
        )
    except ConfigError as exc:
        sys.exit(f"tandem: bad configuration: {exc}")

    from server.launcher import LaunchError, serve

    def announce(line: str) -> None:
        print(f"tandem: {line}", flush=True)

    try:
        asyncio.run(serve(config, announce))
    except LaunchError as exc:
        sys.exit(f"tandem: could not start: {exc}")
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


if __name__ == "__main__":
    main()
