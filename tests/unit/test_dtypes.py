"""`dtype: auto` picks the float type the device computes natively, and that type reaches the model."""

from __future__ import annotations

import pytest
import torch

from configs.loader import ModelConfig
from tests.tiny_model import make_tiny_checkpoint
from workers.model import dtypes
from workers.shell import load_worker_model


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch, native_bf16, expected):
    # catches "auto" fixed to one type: bf16 emulated on an AVX2-only CPU (4-8x slower
    # batched passes), or float32 where AVX512/AMX would run bf16 passes at half the bytes
    monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: native_bf16)
    assert dtypes.compute_dtype("auto", "cpu", "none") == expected
    assert dtypes.compute_dtype("float32", "cpu", "none") == torch.float32  # a named type is kept as it is
    assert dtypes.compute_dtype("bfloat16", "cpu", "none") == torch.bfloat16


def test_a_worker_model_computes_in_the_resolved_type(monkeypatch, tmp_path):
    # catches a loader that still reads the config's string as a torch attribute ("auto")
    path = make_tiny_checkpoint(tmp_path, vocab_size=256, seed=0)
    for native_bf16, expected, name in ((False, torch.float32, "float32"), (True, torch.bfloat16, "bfloat16")):
        monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: native_bf16)
        model, _ = load_worker_model(ModelConfig(path=str(path), dtype="auto"), torch.device("cpu"))
        assert model.dtype == expected
        assert dtypes.dtype_name(model.dtype) == name  # what rank 0 hands its EasySpec / TP ranks



@pytest.mark.parametrize("quantization", ["gguf", "gguf-q4"])
@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_is_float32_for_a_model_served_from_its_gguf_blocks(monkeypatch, native_bf16, quantization):
    # catches "auto" giving bf16 to a qgemm model on an AVX512-BF16 CPU: its layers then leave the
    # one C call (float32 only) and every kernel converts around bf16 (its 1-token pass 2x)
    monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: native_bf16)
    assert dtypes.compute_dtype("auto", "cpu", quantization) == torch.float32
    assert dtypes.compute_dtype("bfloat16", "cpu", quantization) == torch.bfloat16  # asked for by name: kept
    assert dtypes.compute_dtype("auto", "cpu", "int4") == (torch.bfloat16 if native_bf16 else torch.float32)


def test_a_gguf_worker_model_computes_in_float32_where_the_cpu_has_bf16(monkeypatch, tmp_path):
    # catches the worker resolving "auto" without the model's quantization
    from tests.unit.test_gguf_weights import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "qwen2")
    monkeypatch.setattr(dtypes, "cpu_computes_bf16", lambda: True)
    model, _ = load_worker_model(ModelConfig(path=str(path), dtype="auto", quantization="gguf"), torch.device("cpu"))
    assert model.dtype == torch.float32
