"""bench.llamacpp and the peer rows' wiring, without building or running llama.cpp."""

import os
from pathlib import Path

import pytest

from bench import llamacpp
from bench.__main__ import _parser, llamacpp_peers
from bench.harness import BenchError
from bench.peers import Peer, api_base, parse_external, peer_models, resolve_gguf
from tests.helpers import write_config


def options(cmd: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in cmd if arg.startswith("-D"))


AVX512_CPU = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16"}
AVX2_CPU = {"avx", "avx2", "fma", "f16c"}


def test_cmake_configure_names_the_instruction_sets_and_turns_amx_off():
    cmd = llamacpp.configure_command(Path("/src"), Path("/build"), AVX512_CPU)
    assert cmd[:5] == ["cmake", "-S", "/src", "-B", "/build"]
    opts = options(cmd)
    assert opts["GGML_NATIVE"] == "OFF"  # native: SIGILL at the first batched pass on an AVX512 CPU here
    for isa in ("AVX", "AVX2", "FMA", "F16C", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"):
        assert opts[f"GGML_{isa}"] == "ON", isa
    for amx in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert opts[amx] == "OFF", amx
    assert opts["CMAKE_BUILD_TYPE"] == "Release"
    assert opts["LLAMA_USE_PREBUILT_UI"] == "OFF" and opts["LLAMA_OPENSSL"] == "OFF"  # nothing fetched


def test_an_avx2_cpu_gets_no_avx512_code_nor_an_avx512_build(monkeypatch, tmp_path):
    # catches AVX512 named unconditionally: on an AVX2-only CPU (AMD Zen3 here) such a
    # build dies with SIGILL; and one cache directory shared by both builds
    opts = options(llamacpp.configure_command(Path("/src"), Path("/build"), AVX2_CPU))
    for isa in ("AVX", "AVX2", "FMA", "F16C"):
        assert opts[f"GGML_{isa}"] == "ON", isa
    for isa in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"):
        assert opts[f"GGML_{isa}"] == "OFF", isa
    no_bf16 = options(llamacpp.configure_command(Path("/src"), Path("/build"), AVX512_CPU - {"avx512_bf16"}))
    assert (no_bf16["GGML_AVX512"], no_bf16["GGML_AVX512_BF16"]) == ("ON", "OFF")
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    assert llamacpp.home(flags=AVX2_CPU) != llamacpp.home(flags=AVX512_CPU)
    assert llamacpp.home(flags=AVX2_CPU).name == f"{llamacpp.VERSION}-avx2"


def test_cmake_build_is_niced_two_jobs_two_targets():
    cmd = llamacpp.build_command(Path("/build"))
    assert cmd[:3] == ["nice", "-n", "10"]
    assert cmd[cmd.index("-j") + 1] == "2"
    assert cmd[cmd.index("--target") + 1:] == ["llama-server", "llama-bench"]


def fake_build(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    for name in llamacpp.TARGETS:
        path = root / "bin" / name
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    return root / "bin"


def test_build_returns_at_once_when_the_binaries_are_there(tmp_path, monkeypatch):
    bin_dir = fake_build(tmp_path)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a built tree must not run cmake again")

    monkeypatch.setattr(llamacpp.subprocess, "run", no_subprocess)
    monkeypatch.setattr(llamacpp, "fetch_sdist", no_subprocess)
    assert llamacpp.build(tmp_path) == bin_dir
    assert llamacpp.require_built(tmp_path) == bin_dir


def test_missing_toolchain_and_missing_build_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(llamacpp.LlamaCppError, match="make llamacpp"):
        llamacpp.require_built(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    with pytest.raises(llamacpp.LlamaCppError, match="cmake.*apt-get install cmake build-essential"):
        llamacpp.build(tmp_path)


def test_cache_directory_is_under_tandem_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path))
    here = f"{llamacpp.VERSION}-{llamacpp.isa_tag(llamacpp.cpu_flags())}"
    assert llamacpp.home() == tmp_path / "llama.cpp" / here
    assert llamacpp.binary("llama-server") == tmp_path / "llama.cpp" / here / "bin" / "llama-server"


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_llama_server_plain_command():
    cmd = llamacpp.server_command(Path("/b/llama-server"), Path("/m/t.gguf"), 8091)
    assert cmd[0] == "/b/llama-server" and flag(cmd, "-m") == "/m/t.gguf"
    assert (flag(cmd, "--host"), flag(cmd, "--port")) == ("127.0.0.1", "8091")
    assert flag(cmd, "-t") == flag(cmd, "-tb") == "2" and flag(cmd, "-np") == "1"
    assert int(flag(cmd, "-c")) >= 2048
    assert "--no-cache-prompt" in cmd and flag(cmd, "--cache-ram") == "0"  # no prompt reuse across requests
    assert "-md" not in cmd and "--spec-type" not in cmd


def test_llama_server_slots_share_the_context():
    # catches a load-table peer that batches nothing (-np left at 1) or gives each slot a sliver of KV
    cmd = llamacpp.server_command(Path("s"), Path("t.gguf"), 1, slots=8)
    assert flag(cmd, "-np") == "8" and int(flag(cmd, "-c")) // 8 == llamacpp.SERVER_CTX


def test_llama_server_draft_command():
    cmd = llamacpp.server_command(Path("s"), Path("t.gguf"), 1, threads=1, draft=Path("d.gguf"), draft_n=6)
    assert flag(cmd, "-md") == "d.gguf"
    assert flag(cmd, "--spec-type") == "draft-simple" and flag(cmd, "--spec-draft-n-max") == "6"
    assert flag(cmd, "-t") == flag(cmd, "-td") == flag(cmd, "-tbd") == "1"


def test_llama_bench_command_and_cost_table():
    cmd = llamacpp.bench_command(Path("lb"), [Path("t.gguf"), Path("d.gguf")], [1, 2], [1, 8])
    assert cmd.count("-m") == 2 and flag(cmd, "-t") == "1,2" and flag(cmd, "-n") == "64"
    assert flag(cmd, "-p") == "1,8" and flag(cmd, "-o") == "json"
    records = [
        {"model_filename": "t.gguf", "n_threads": 2, "n_prompt": 0, "n_gen": 64, "avg_ns": 6.4e9, "avg_ts": 10.0},
        {"model_filename": "t.gguf", "n_threads": 2, "n_prompt": 8, "n_gen": 0, "avg_ns": 4.0e8, "avg_ts": 20.0},
    ]
    table = llamacpp.cost_table(records, {"t.gguf": "target t.gguf"})
    assert "| target t.gguf | 2 | pp8 | 400.0 | 50.0 | 20.0 |" in table  # one 8-token pass: 400 ms
    assert "| target t.gguf | 2 | tg64 | 100.0 | 100.0 | 10.0 |" in table  # 64 passes of 100 ms


def test_external_parsing():
    assert parse_external("vllm=http://127.0.0.1:8000") == Peer("vllm", url="http://127.0.0.1:8000/v1")
    assert parse_external(" x = http://h:1/v1/ ").url == "http://h:1/v1"
    assert api_base("http://h:1/") == "http://h:1/v1"
    for bad in ("http://h:1", "=http://h:1", "x=h:1", "x=ftp://h", "x=http://"):
        with pytest.raises(BenchError):
            parse_external(bad)


def test_gguf_paths_resolve_from_the_config_or_the_overrides(tmp_path):
    target, draft = tmp_path / "t.gguf", tmp_path / "d.gguf"
    target.write_bytes(b"GGUF")
    draft.write_bytes(b"GGUF")
    config = write_config(tmp_path / "c.yaml", target={"path": str(target)}, draft={"path": str(draft)})
    assert peer_models(str(config), None, None) == (target, draft)
    assert peer_models(str(config), str(draft), str(target)) == (draft, target)
    with pytest.raises(BenchError, match="GGUF"):
        resolve_gguf(str(tmp_path))  # a Hugging Face directory: llama.cpp cannot serve it
    with pytest.raises(BenchError, match="no such file"):
        resolve_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(BenchError, match="unknown embedded"):
        resolve_gguf("embedded:no-such-model")
    embedded = resolve_gguf("embedded:smollm2-135m-instruct")  # through workers.model.embedded
    with open(embedded, "rb") as f:
        assert embedded.suffix == ".gguf" and f.read(4) == b"GGUF"


def test_peer_rows_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    bin_dir = fake_build(llamacpp.home())
    target, draft = tmp_path / "t.gguf", tmp_path / "d.gguf"
    target.write_bytes(b"GGUF")
    draft.write_bytes(b"GGUF")
    args = _parser().parse_args(
        ["--modes", "", "--peer", "llamacpp", "--peer-target", str(target), "--peer-draft", str(draft), "--port", "8123"]
    )
    peers = llamacpp_peers(args)
    assert [p.label for p in peers] == ["llama.cpp", "llama.cpp+draft n=3", "llama.cpp+draft n=6"]
    plain, n3, n6 = (list(p.command) for p in peers)
    assert plain[0] == str(bin_dir / "llama-server") and flag(plain, "--port") == "8123"
    assert "-md" not in plain and flag(n3, "-md") == str(draft) and flag(n6, "--spec-draft-n-max") == "6"
    args = _parser().parse_args(["--peer", "llamacpp", "--peer-target", str(target), "--peer-draft", str(draft),
                                 "--peer-draft-n", ""])
    assert [p.label for p in llamacpp_peers(args)] == ["llama.cpp"]
    args = _parser().parse_args(["--peer", "llamacpp", "--peer-target", str(target), "--peer-draft", str(draft),
                                 "--peer-draft-n", "3", "--peer-threads", "2,1"])
    peers = llamacpp_peers(args)
    assert [p.label for p in peers] == ["llama.cpp t=2", "llama.cpp+draft n=3 t=2", "llama.cpp t=1", "llama.cpp+draft n=3 t=1"]
    assert [flag(list(p.command), "-t") for p in peers] == ["2", "2", "1", "1"]
    assert flag(list(peers[3].command), "-td") == "1"


def test_the_bench_refuses_a_peer_that_is_not_built(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "TANDEM_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "bench", "--modes", "", "--peer", "llamacpp"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0 and "make llamacpp" in out.stderr
