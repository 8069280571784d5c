"""Run lm-evaluation-harness's loglikelihood task `tandem_arith` against a running
Tandem server (`make serve` in another terminal; `make lmeval` runs this):

    python -m bench.lmeval [--config configs/default.yaml] [--url http://127.0.0.1:8000] [--limit N]

lm-eval's `local-completions` model sends each choice as one request with
`echo: true, logprobs: 1, max_tokens: 1` and sums the prompt logprobs of the
choice's tokens; it needs the model's tokenizer to know where the context
ends, which is read from the config's target (the same files the server uses,
nothing downloaded). lm-eval runs from its own venv (LMEVAL, default
.lmeval-venv/bin/lm_eval); results go to bench/results/lmeval/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench.lmeval.make_task import DATA, HERE, main as write_task
from configs.loader import DEFAULT_CONFIG, load_config

REPO = HERE.parent.parent


def model_args(config_path: str, url: str) -> str:
    from workers.model.checkpoints import resolve_checkpoint

    config = load_config(config_path)
    tokenizer_dir = resolve_checkpoint(config.target.path, progress=lambda line: None)
    return ",".join([
        f"model={config.served_model_names[0]}",
        f"base_url={url.rstrip('/')}/v1/completions",
        f"tokenizer={tokenizer_dir}",
        "tokenizer_backend=huggingface",
        "num_concurrent=1",
        "max_retries=1",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lmeval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the config the server runs")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--lm-eval", default=os.environ.get("LMEVAL", ".lmeval-venv/bin/lm_eval"))
    args = parser.parse_args(argv)
    if not DATA.exists():
        write_task()
    command = [
        args.lm_eval, "--model", "local-completions", "--model_args", model_args(args.config, args.url),
        "--include_path", str(HERE.relative_to(REPO)), "--tasks", "tandem_arith",
        "--output_path", "bench/results/lmeval",
        *(["--limit", str(args.limit)] if args.limit else []),
    ]
    print("+ " + " ".join(command), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    sys.exit(subprocess.run(command, cwd=REPO, env=env).returncode)


if __name__ == "__main__":
    main()
