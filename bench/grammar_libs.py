"""Which grammar library masks tokens cheapest: llguidance, xgrammar, outlines-core.

    python -m bench.grammar_libs [--tokenizer DIR ...] [--repeat 3]

For each tokenizer (default: the default config's SmolLM2 and, where it is
installed, the real pair's Qwen2.5) and each library that imports, it compiles
one JSON schema (setup: tokenizer wrap + grammar compile, the first request's
cost) and walks the tokens of a document that satisfies it, timing per token
what a decoding step pays: the allowed-token bitmask for the next position and
advancing the matcher by the chosen token, for the first request of the schema
(what is built lazily is built then) and for later requests. Tandem serves llguidance (the
pinned dependency); the others are measured only where they happen to be
importable (`pip install --target DIR ...; PYTHONPATH=DIR`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "role", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace, Countess",
    "age": 36,
    "languages": ["English", "French", "Mathematics", "Analytical Engine"],
    "role": "admin",
    "active": True,
}


def _llguidance(tokenizer, vocab_size: int):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    setup_s = time.perf_counter() - started
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def new_request():
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)

        def step(token: int) -> None:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance refused token {token}: {matcher.get_error()}")

        return step

    return setup_s, new_request


def _xgrammar(tokenizer, vocab_size: int):
    import xgrammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":")
    )
    setup_s = time.perf_counter() - started
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def new_request():
        matcher = xgrammar.GrammarMatcher(compiled)

        def step(token: int) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            if not matcher.accept_token(token):
                raise RuntimeError(f"xgrammar refused token {token}")

        return step

    return setup_s, new_request


def _outlines_core(tokenizer, vocab_size: int):
    import outlines_core
    from outlines_core.kernels.torch import allocate_token_bitmask

    from server.tokenization import token_bytes

    started = time.perf_counter()
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _bytes_map(tokenizer, token_bytes))
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = outlines_core.Index(regex, vocabulary)
    setup_s = time.perf_counter() - started
    bitmask = allocate_token_bitmask(vocab_size)

    def new_request():
        guide = outlines_core.Guide(index)

        def step(token: int) -> None:
            guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())
            guide.advance(token, return_tokens=False)

        return step

    return setup_s, new_request


def _bytes_map(tokenizer, token_bytes) -> dict[bytes, list[int]]:
    special = set(tokenizer.all_special_ids)
    out: dict[bytes, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id not in special:
            out.setdefault(token_bytes(tokenizer, token_id), []).append(token_id)
    return out


LIBRARIES = {"llguidance": _llguidance, "xgrammar": _xgrammar, "outlines-core": _outlines_core}


def default_tokenizers() -> list[Path]:
    """The default config's model and, if assembled here, the real pair's target."""
    from configs.loader import load_config
    from workers.model import resolve_checkpoint

    paths = [resolve_checkpoint(load_config("configs/default.yaml").target.path)]
    try:
        paths.append(resolve_checkpoint(load_config("configs/qwen2.5-coder.yaml").target.path))
    except Exception as exc:  # the pair's packages are not installed
        print(f"(skipping the real pair's tokenizer: {exc})")
    return paths


def measure(path: Path, library: str, repeat: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    tokens = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    first: list[float] = []  # the first request of a schema (lazy parts built as they are reached)
    later: list[float] = []  # later requests of the same compiled schema
    setups: list[float] = []
    for _ in range(repeat):
        setup_s, new_request = LIBRARIES[library](tokenizer, vocab_size)
        setups.append(setup_s)
        for times in (first, later, later):
            step = new_request()
            started = time.perf_counter()
            for token in tokens:
                step(token)
            times.append((time.perf_counter() - started) / len(tokens))
    return {
        "tokenizer": path.name,
        "vocab": vocab_size,
        "library": library,
        "tokens": len(tokens),
        "setup_ms": 1000 * statistics.median(setups),
        "first_us_per_token": 1e6 * statistics.median(first),
        "us_per_token": 1e6 * statistics.median(later),
    }


def apply_cost_us(vocab_size: int, rows: int = 1, repeat: int = 200) -> float:
    """Applying a bitmask to [rows, V] float32 logits (Tandem's own kernel, the same for every library)."""
    from workers.sampling.grammar import apply_bitmask

    logits = torch.randn(rows, vocab_size)
    bitmask = torch.full((rows, (vocab_size + 31) // 32), 0x0F0F0F0F, dtype=torch.int32)
    apply_bitmask(logits, bitmask)
    started = time.perf_counter()
    for _ in range(repeat):
        apply_bitmask(logits, bitmask)
    return 1e6 * (time.perf_counter() - started) / repeat


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", action="append", type=Path, help="a model directory (repeatable)")
    parser.add_argument("--library", action="append", choices=sorted(LIBRARIES))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| tokenizer | vocab | library | setup ms | first request us/token | later requests us/token "
          "| apply mask us/token |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for path in args.tokenizer or default_tokenizers():
        for library in args.library or list(LIBRARIES):
            try:
                row = measure(path, library, args.repeat)
            except ImportError as exc:
                print(f"| {path.name} | | {library} | not importable ({exc.name}) | | | |")
                continue
            except Exception as exc:  # a library that refuses the schema or the document
                print(f"| {path.name} | | {library} | failed: {exc} | | | |")
                continue
            print(f"| {row['tokenizer']} | {row['vocab']} | {library} | {row['setup_ms']:.0f} | "
                  f"{row['first_us_per_token']:.1f} | {row['us_per_token']:.1f} | {apply_cost_us(row['vocab']):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
