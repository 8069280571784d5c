"""What a structured-output request costs per token, with and without its grammar.

    python -m bench.structured [--modes ar,sd] [--config FILE] [--dtype float32] [--max-tokens 128]
        [--schema FILE.json | --schema json_object] [--port 8090]

For each mode, one server: a warm-up of each kind (the first grammar request also
wraps the tokenizer for llguidance in each worker: reported, not counted), then the
same JSON-asking chat prompts with `response_format` and without a grammar, greedy;
without it each prompt gets as many tokens as its JSON took (the prefill weighs the same).
Per kind: completion tokens, ms per token (client wall time / tokens), tokens per
target pass, acceptance, and how many outputs parse and validate against the schema.
The two kinds write different texts (prose or JSON), so acceptance may differ too;
ms per token of the target alone (`ar`) isolates the mask's cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.harness import REPO_ROOT, Client, Prompt, Run, ServerProcess, Settings, log_path
from configs.choices import DTYPES

PROMPTS = [
    Prompt("person", "chat", "Describe a fictional person as JSON: name, age, city and three hobbies."),
    Prompt("book", "chat", "Give me a JSON record of a classic novel: title, author, year and main characters."),
    Prompt("order", "chat", "Write a JSON order for a coffee shop: items with names, sizes and prices, and a total."),
    Prompt("weather", "chat", "Report the weather in three cities as JSON, with temperatures and conditions."),
]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "value": {"type": "integer"}},
            "required": ["name", "value"], "additionalProperties": False}},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["title", "items", "summary"],
    "additionalProperties": False,
}


def response_format(schema_arg: str | None) -> tuple[dict, dict]:
    """(the response_format parameter, the schema its outputs must validate against)."""
    if schema_arg == "json_object":
        return {"type": "json_object"}, {"type": "object"}
    schema = json.loads(Path(schema_arg).read_text()) if schema_arg else SCHEMA
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}, schema


def _valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def measure_mode(mode: str, settings: Settings, fmt: dict, schema: dict, log_dir: Path) -> list[dict]:
    rows = []
    with ServerProcess(Run(mode, mode), settings, log_path(log_dir, "structured", mode)) as server:
        client = Client(settings)
        client.send(PROMPTS[0], max_tokens=16)  # warm-up (not counted)
        lengths: list[int | None] = [None] * len(PROMPTS)
        for kind, extra in (("response_format", {"response_format": fmt}), ("no grammar", {})):
            started = time.perf_counter()
            client.send(PROMPTS[0], max_tokens=16, extra=extra)  # warm-up of this kind (not counted)
            first_s = time.perf_counter() - started
            # without the grammar, each prompt gets as many tokens as its JSON took (same prefill share)
            results = [client.send(p, max_tokens=n, extra=extra) for p, n in zip(PROMPTS, lengths)]
            lengths = [r.completion_tokens for r in results]
            if not server.alive():
                raise RuntimeError(f"[{mode}] the server died")
            tokens = sum(r.completion_tokens for r in results)
            wall = sum(r.wall_s for r in results)
            passes = sum(r.num_target_passes or 0 for r in results)
            drafted = sum(r.num_draft_tokens or 0 for r in results)
            accepted = sum(r.num_accepted_tokens or 0 for r in results)
            rows.append({
                "mode": mode, "request": kind, "tokens": tokens,
                "ms_per_token": 1000 * wall / max(tokens, 1),
                "tokens_per_pass": tokens / passes if passes else float("nan"),
                "acceptance": accepted / drafted if drafted else None,
                "valid": sum(_valid(r.text, schema) for r in results), "n": len(results),
                "stopped": sum(r.finish_reason == "stop" for r in results),
                "warm_up_s": first_s,
            })
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["| mode | request | tokens | ms / token | vs no grammar | tokens / target pass | acceptance "
             "| ended (not cut) | valid JSON | warm-up request s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {mode: i for i, mode in reversed(list(enumerate(r["mode"] for r in rows)))}
    rows = sorted(rows, key=lambda r: (order[r["mode"]], r["request"] != "no grammar"))  # each mode's baseline first
    base = {r["mode"]: r["ms_per_token"] for r in rows if r["request"] == "no grammar"}
    for r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        lines.append(f"| {r['mode']} | {r['request']} | {r['tokens']} | {r['ms_per_token']:.1f} | "
                     f"{r['ms_per_token'] / base[r['mode']]:.2f}x | {r['tokens_per_pass']:.2f} | {acceptance} | "
                     f"{r['stopped']}/{r['n']} | {r['valid']}/{r['n']} | {r['warm_up_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="ar,sd")
    parser.add_argument("--config")
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--schema", help="a JSON schema file, or json_object (default: a built-in schema)")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    settings = Settings(config=args.config, dtype=args.dtype, port=args.port, max_tokens=args.max_tokens,
                        temperature=0.0, top_p=None, seed=None, num_draft_tokens=None, logprobs=False,
                        startup_timeout_s=900.0, request_timeout_s=900.0)
    fmt, schema = response_format(args.schema)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for mode in args.modes.split(",") if mode for row in measure_mode(mode, settings, fmt, schema, out)]
    table = to_markdown(rows)
    print(table)
    (out / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
