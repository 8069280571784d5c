"""Serving GGUF files as they are (workers/model/gguf_file.py, loader quantization 'gguf'/'int4')
and the reduced FR-Spec draft head (SubsetHead, head_vocab).

The GGUF files are built here with gguf's GGUFWriter: tiny `qwen2` and `llama` models
(hidden 256, so a Q4_K/Q6_K super-block of 256 weights fits a row; 2 layers; 300 tokens)
whose tensors come in a mix of types. Types gguf.quants can quantize (Q4_0, Q4_1, Q5_0,
Q8_0) are quantized from random floats; Q4_K and Q6_K (no quantizer in gguf) are random
raw blocks with sane fp16 scales. The "truth" for each tensor is gguf.quants.dequantize of
its blocks, put in Hugging Face row order by this file's own inverse of llama.cpp's q/k
permutation, written as safetensors for a reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.model.qlinear import QLinear, QuantParts, kernel, machine_can_build

import gguf  # a dependency of the project (pyproject): no skip if it is missing
from gguf import GGMLQuantizationType as QT

from server.tokenization import bytes_to_unicode
from workers.model import load_model
from workers.model.gguf_file import GGUFFile, int4_parts
from workers.model.linear import ConcatLinear, Int4Linear, int4_available
from workers.model.loader import SubsetHead, subset_vocabulary
from workers.model.model import TwoRowFloor

needs_int4 = pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 kernel")

DIM, FFN, LAYERS, VOCAB = 256, 512, 2, 300
N_HEADS, N_KV_HEADS = 8, 2  # n_heads != n_kv_heads: q and k are un-permuted with different head counts
HEAD_DIM = DIM // N_HEADS
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids VOCAB-3 .. VOCAB-1

# HF tensor name suffix -> GGUF type, per layer: every 4-bit type, the fused qkv mixing a
# 4-bit and a non-4-bit part in both orders, a fused gate/up of two different 4-bit types.
LAYER_TYPES = [
    {
        "self_attn.q_proj": QT.Q4_K, "self_attn.k_proj": QT.Q4_0, "self_attn.v_proj": QT.Q6_K,
        "self_attn.o_proj": QT.Q4_1, "mlp.gate_proj": QT.Q4_K, "mlp.up_proj": QT.Q4_1, "mlp.down_proj": QT.Q6_K,
    },
    {
        "self_attn.q_proj": QT.Q8_0, "self_attn.k_proj": QT.Q5_0, "self_attn.v_proj": QT.Q4_K,
        "self_attn.o_proj": QT.F32, "mlp.gate_proj": QT.Q5_0, "mlp.up_proj": QT.Q8_0, "mlp.down_proj": QT.Q4_K,
    },
]
GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
# Which linears are int4 under 'gguf' (per layer): (wqkv kind, wo, w13, w2)
INT4_UNDER_GGUF = [
    ("concat:int4,dense", Int4Linear, Int4Linear, "dense"),
    ("concat:dense,int4", "dense", "dense", Int4Linear),
]


# --- building GGUF files -------------------------------------------------------------


def _vocabulary() -> tuple[list[str], list[str]]:
    """300 tokens: 256 bytes, 41 merges of letter pairs, 3 special tokens; and the merges."""
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    letters = "etaoinshrdlucm"
    pairs = [(a, b) for a in letters for b in letters if a != b][: VOCAB - 256 - len(SPECIAL)]
    merges = [f"{a} {b}" for a, b in pairs]
    return byte_tokens + [a + b for a, b in pairs] + SPECIAL, merges


def _random_q4_k(rng, n_rows: int, k: int) -> np.ndarray:
    """Random Q4_K blocks (144 bytes per 256 weights): any nibbles and 6-bit scales/mins are
    valid; d and dmin are sane fp16 values (dmin ~ 7.5 d centres the weights)."""
    n = n_rows * k // 256
    blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    d = rng.uniform(2e-4, 5e-4, size=n).astype(np.float16)
    dmin = (d.astype(np.float32) * rng.uniform(6.0, 9.0, size=n)).astype(np.float16)
    blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    blocks[:, 2:4] = dmin.view(np.uint8).reshape(n, 2)
    return blocks.reshape(n_rows, -1)


def _random_q6_k(rng, n_rows: int, k: int) -> np.ndarray:
    """Random Q6_K blocks (210 bytes per 256 weights: ql, qh, 16 int8 scales, fp16 d last)."""
    n = n_rows * k // 256
    blocks = rng.integers(0, 256, size=(n, 210), dtype=np.uint8)
    d = rng.uniform(5e-5, 1.5e-4, size=n).astype(np.float16)
    blocks[:, 208:210] = d.view(np.uint8).reshape(n, 2)
    return blocks.reshape(n_rows, -1)


def _encode(rng, shape: tuple[int, int], qtype) -> np.ndarray:
    """Random weights of `shape` (numpy/torch order [N, K]) stored as qtype: float32 or raw uint8 blocks."""
    if qtype == QT.F32:
        return (0.08 * rng.standard_normal(shape)).astype(np.float32)
    if qtype == QT.Q4_K:
        return _random_q4_k(rng, *shape)
    if qtype == QT.Q6_K:
        return _random_q6_k(rng, *shape)
    return gguf.quants.quantize((0.08 * rng.standard_normal(shape)).astype(np.float32), qtype)


def _decode(stored: np.ndarray, qtype) -> np.ndarray:
    if qtype == QT.F32:
        return stored
    return gguf.quants.dequantize(stored, qtype).astype(np.float32)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF order -> GGUF order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_rows(gguf_order: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_cpp_permute, computed from it (not from the code under test)."""
    index = llama_cpp_permute(np.arange(gguf_order.shape[0]), n_head)  # gguf row i holds HF row index[i]
    out = np.empty_like(gguf_order)
    out[index] = gguf_order
    return out


def hf_config(arch: str) -> dict:
    config = {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": VOCAB,
        "hidden_size": DIM,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": arch == "qwen2",
        "bos_token_id": VOCAB - 3,
        "eos_token_id": VOCAB - 1,
    }
    if arch == "llama":
        config["attention_bias"] = False
    return config


def write_tiny_gguf(path: Path, arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny `arch` model as a GGUF file; return its de-quantized tensors by HF name.

    qwen2: tied embeddings (Q8_0), q/k/v biases. llama: untied, embeddings Q6_K, head Q4_K,
    q/k rows permuted as llama.cpp stores them.
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(512)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        w.add_rope_dimension_count(HEAD_DIM)
    tokens, merges = _vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - len(SPECIAL)) + [3] * len(SPECIAL))
    w.add_token_merges(merges)
    w.add_bos_token_id(VOCAB - 3)
    w.add_eos_token_id(VOCAB - 1)

    truth: dict[str, torch.Tensor] = {}

    def put(hf_name: str, gguf_name: str, shape: tuple[int, ...], qtype, permute_heads: int = 0):
        if len(shape) == 1:
            stored = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)  # norms near 1, biases
            if hf_name.endswith(".bias"):
                stored = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            w.add_tensor(gguf_name, stored)
            truth[hf_name] = torch.from_numpy(stored.copy())
            return
        stored = _encode(rng, shape, qtype)
        if qtype == QT.F32:
            w.add_tensor(gguf_name, stored)
        else:
            w.add_tensor(gguf_name, stored, raw_dtype=qtype)
        values = _decode(stored, qtype).reshape(shape)
        if permute_heads:
            values = _hf_rows(values, permute_heads)
        truth[hf_name] = torch.from_numpy(np.ascontiguousarray(values))

    put("model.embed_tokens.weight", "token_embd.weight", (VOCAB, DIM), QT.Q8_0 if arch == "qwen2" else QT.Q6_K)
    for i, types in enumerate(LAYER_TYPES):
        for part in ("input_layernorm", "post_attention_layernorm"):
            put(f"model.layers.{i}.{part}.weight", f"blk.{i}.{GGUF_LAYER[part]}.weight", (DIM,), QT.F32)
        for part, qtype in types.items():
            n_out, n_in = {
                "self_attn.q_proj": (N_HEADS * HEAD_DIM, DIM), "self_attn.k_proj": (N_KV_HEADS * HEAD_DIM, DIM),
                "self_attn.v_proj": (N_KV_HEADS * HEAD_DIM, DIM), "self_attn.o_proj": (DIM, N_HEADS * HEAD_DIM),
                "mlp.gate_proj": (FFN, DIM), "mlp.up_proj": (FFN, DIM), "mlp.down_proj": (DIM, FFN),
            }[part]
            heads = 0
            if arch == "llama" and part == "self_attn.q_proj":
                heads = N_HEADS
            elif arch == "llama" and part == "self_attn.k_proj":
                heads = N_KV_HEADS
            put(f"model.layers.{i}.{part}.weight", f"blk.{i}.{GGUF_LAYER[part]}.weight", (n_out, n_in), qtype, heads)
            if arch == "qwen2" and part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                put(f"model.layers.{i}.{part}.bias", f"blk.{i}.{GGUF_LAYER[part]}.bias", (n_out,), QT.F32)
    put("model.norm.weight", "output_norm.weight", (DIM,), QT.F32)
    if arch == "llama":
        put("lm_head.weight", "output.weight", (VOCAB, DIM), QT.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return truth


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer.json over _vocabulary() (the special tokens as added tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = _vocabulary()
    vocab = {t: i for i, t in enumerate(tokens[: VOCAB - len(SPECIAL)])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk)
    fast.add_special_tokens({"additional_special_tokens": SPECIAL})
    fast.save_pretrained(directory)


def gguf_checkpoint(root: Path, arch: str, seed: int = 0) -> tuple[Path, Path]:
    """(a resolved GGUF checkpoint dir: config.json + tokenizer + model.gguf link, a safetensors
    dir with the same de-quantized weights by HF name)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    truth = write_tiny_gguf(root / f"tiny-{arch}.gguf", arch, seed)
    g, s = root / "gguf", root / "st"
    for d in (g, s):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(hf_config(arch)))
        write_tokenizer(d)
    (g / "model.gguf").symlink_to(root / f"tiny-{arch}.gguf")
    save_file(truth, str(s / "model.safetensors"), metadata={"format": "pt"})
    return g, s


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def ckpt(request, tmp_path_factory):
    return (request.param, *gguf_checkpoint(tmp_path_factory.mktemp(request.param), request.param))


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill of all but the last 4 tokens, then 1- and 3-token incremental passes."""
    cache = model.new_cache(64)
    n = tokens.shape[0]
    with torch.no_grad():
        out = [model.forward(tokens[: n - 4], cache, num_logits=n - 4)]
        out.append(model.forward(tokens[n - 4 : n - 3], cache, num_logits=1))
        out.append(model.forward(tokens[n - 3 :], cache, num_logits=3))
    return torch.cat(out)


# --- 1. 4-bit blocks as int4 parts ------------------------------------------------------


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K], ids=lambda t: t.name)
def test_int4_parts_equal_gguf_dequantize(qtype):
    """Catches a wrong nibble order, scale/min unpacking (Q4_K's 6-bit packing) or zero
    (Q4_1's m, Q4_K's dmin) in int4_parts: its parts must de-quantize to gguf's own values."""
    rng = np.random.default_rng(1)
    shape = (64, 512)
    raw = _encode(rng, shape, qtype)
    expected = torch.from_numpy(_decode(raw, qtype).reshape(shape))
    parts = int4_parts(raw, qtype.name, shape)
    assert parts.q.shape == shape and parts.group == 32
    assert int(parts.q.min()) >= 0 and int(parts.q.max()) <= 15
    assert expected.abs().max() > 0.01  # the blocks are not degenerate
    torch.testing.assert_close(parts.dequantize(), expected, rtol=1e-5, atol=1e-6)


@needs_int4
@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1, QT.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("shape", [(96, 512), (300, 256)])
def test_int4_linear_from_gguf_parts_matches_dense(qtype, rows, shape):
    """Catches Int4Linear packing the parts wrongly (scales/zeros layout, q order): its output
    must be x @ W.T within the bf16 rounding of the kernel (inputs, scales and zeros in bf16).
    (300, 256): an output size the CPU int4 packing cannot take as is (N % 16 != 0), like a
    4-bit head over a vocabulary of 300 (or 32001) tokens; it used to raise at load."""
    rng = np.random.default_rng(2)
    raw = _encode(rng, shape, qtype)
    weight = torch.from_numpy(_decode(raw, qtype).reshape(shape))
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(3))
    lin = Int4Linear(int4_parts(raw, qtype.name, shape), bias, torch.float32, "cpu")
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(4))
    expected = x @ weight.T + bias
    got = lin(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    err = (got - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, err
    # and not trivially: a neighbour's weights (rows shifted by one) are far off
    assert ((x @ weight.roll(1, 0).T + bias) - expected).abs().max() / expected.abs().max() > 0.2


# --- 2. 'none': the GGUF file de-quantized = the same weights from safetensors ---------


def test_gguf_file_names_and_llama_unpermutation(ckpt):
    """Catches a wrong HF->GGUF name, a wrong or missing q/k un-permutation (llama, with
    n_heads != n_kv_heads), or reading a tensor transposed: every tensor GGUFFile returns
    equals the independently de-quantized truth."""
    arch, g, s = ckpt
    from safetensors.torch import load_file

    truth = load_file(str(s / "model.safetensors"))
    f = GGUFFile(g / "model.gguf")
    assert f.architecture == arch
    for name, expected in truth.items():
        assert name in f, name
        got = f.get(name)
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
        if f.is_int4(name):  # the int4 parts are un-permuted the same way
            torch.testing.assert_close(f.int4(name).dequantize(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert "lm_head.weight" in f if arch == "llama" else "lm_head.weight" not in f


def test_gguf_none_equals_safetensors_model(ckpt):
    """Catches a wrong name mapping, q/k un-permutation, bias (qwen2) or tied/untied head in
    the GGUF load path: float32 'none' logits equal those of the same weights from safetensors."""
    arch, g, s = ckpt
    tokens = _tokens(20)
    ref = load_model(s, torch.float32, "none")
    model = load_model(g, torch.float32, "none")
    expected, got = _logits(ref, tokens), _logits(model, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(set(expected.argmax(-1).tolist())) > 3  # a varied model, not one token everywhere


@pytest.mark.parametrize("ckpt", ["llama"], indirect=True)
def test_llama_without_unpermutation_differs(ckpt, monkeypatch):
    """Guards the test above: the q/k permutation matters for these weights (if GGUFFile did not
    un-permute, the llama logits would differ by far more than the tolerance)."""
    arch, g, s = ckpt
    model = load_model(g, torch.float32, "none")
    tokens = _tokens(20)
    good = _logits(model, tokens)
    f = GGUFFile(g / "model.gguf")
    f.architecture = "qwen2"  # no un-permutation
    import workers.model.loader as loader

    monkeypatch.setattr(loader, "open_weights", lambda path: f)
    bad = _logits(load_model(g, torch.float32, "none"), tokens)
    assert (bad - good).abs().max() > 1e-2


# --- 3. 'gguf': 4-bit blocks served as int4, the rest dense ------------------------------


def _unwrapped(module):
    """The linear itself, when the batch-invariance probe made its 1-row calls 2-row ones."""
    return module.inner if isinstance(module, TwoRowFloor) else module


def _kind(module) -> object:
    module = _unwrapped(module)
    if isinstance(module, ConcatLinear):
        return "concat:" + ",".join("int4" if isinstance(p, Int4Linear) else "dense" for p in module.parts)
    if isinstance(module, Int4Linear):
        return Int4Linear
    assert "Int" not in type(module).__name__, module  # dense: packed or nn.Linear, not re-quantized
    return "dense"


@needs_int4
def test_gguf_quantization_keeps_4bit_blocks_as_int4(ckpt, monkeypatch):
    """Without the qgemm kernel (another CPU): catches 4-bit tensors being de-quantized (or
    others re-quantized) under 'gguf', a fused qkv of mixed types not split into a
    ConcatLinear, or its bias sliced wrongly (qwen2): layer kinds as stored, logits within
    bf16-scale error of the 'none' model."""
    import workers.model.loader as loader

    monkeypatch.setattr(loader, "kernel_available", lambda: False)
    arch, g, s = ckpt
    model = load_model(g, torch.float32, "gguf")
    for layer, kinds in zip(model.layers, INT4_UNDER_GGUF):
        got = tuple(_kind(m) for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2))
        assert got == kinds
    assert _kind(model.output) == (Int4Linear if arch == "llama" else "dense")  # Q4_K head / tied Q8_0 embeddings
    if arch == "qwen2":  # the q/k/v bias follows its rows into the concat parts
        bias = torch.cat([_unwrapped(model.layers[0].attention.wqkv).parts[i].bias for i in range(2)])
        torch.testing.assert_close(bias, torch.cat([GGUFFile(g / "model.gguf").get(f"model.layers.0.self_attn.{p}.bias") for p in ("q_proj", "k_proj", "v_proj")]))
    # the int4 parts are the file's own blocks: their weights equal the de-quantized tensors
    wo = _unwrapped(model.layers[0].attention.wo)
    expected = GGUFFile(g / "model.gguf").get("model.layers.0.self_attn.o_proj.weight")
    assert ((wo.dequantized() - expected).abs().max() / expected.abs().max()) < 1e-2
    tokens = _tokens(20)
    ref = _logits(load_model(g, torch.float32, "none"), tokens)
    got = _logits(model, tokens)
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


needs_qgemm = pytest.mark.skipif(machine_can_build() is not None, reason=f"qgemm: {machine_can_build()}")


@needs_qgemm
def test_gguf_quantization_serves_every_quantized_tensor_with_qgemm(ckpt):
    """With the kernel: catches a quantized tensor (4-bit, Q6_K, Q5_0, Q8_0) left to torch's
    int4 kernel or de-quantized, a fused projection of two kinds not split, or a wrong
    packing: kinds as stored, every QLinear's weights equal the file's exactly, logits close
    to the 'none' model (int8 activations)."""

    kernel()  # builds it, or fails with the compiler's message
    arch, g, s = ckpt
    f = GGUFFile(g / "model.gguf")
    model = load_model(g, torch.float32, "gguf")
    layer = model.layers[0]
    for module, names in ((layer.attention.wqkv, ["q_proj", "k_proj", "v_proj"]), (layer.feed_forward.w2, ["down_proj"])):
        parts = module.parts if isinstance(module, ConcatLinear) else [module]
        prefix = "model.layers.0.self_attn." if "q_proj" in names else "model.layers.0.mlp."
        quantized = [f.is_quantized(prefix + n + ".weight") for n in names]
        assert all(isinstance(p, QLinear) for p in parts) == all(quantized)
        assert any(isinstance(p, QLinear) for p in parts) == any(quantized)
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        if f.is_quantized(name):  # exact: the packed parts de-quantize to the file's values
            torch.testing.assert_close(f.quant(name).dequantize(), f.get(name), rtol=0, atol=0)
    tokens = _tokens(20)
    ref = _logits(load_model(g, torch.float32, "none"), tokens)
    got = _logits(model, tokens)
    # int8 activations cost ~1% per linear on these random weights (the kernel's arithmetic is
    # held exactly to its definition in test_qgemm.py); a layout or scale bug costs ~100%.
    err = (got - ref).abs().max() / ref.abs().max()
    assert err < 0.25, err
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_quantize_4bit_is_within_half_a_step():
    """QuantParts.quantize_4bit (gguf-q4's re-quantization): q in 0..15, scales and mins float16
    values (what the kernel reads), every weight within half a step of its group's grid, a
    group's min and max within float16's rounding, a constant group exact. Catches a scale off by
    one level (/16), the offset taken as the max, rounding by truncation, a min rounded up or a
    scale down to float16 (weights past the grid's ends)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 96, generator=g) * torch.logspace(-3, 1, 6)[:, None]
    w[2, 32:64] = 0.75  # a constant group
    parts = QuantParts.quantize_4bit(w)
    assert parts.nibbles and parts.half and parts.layout == 3 and parts.group == 32 and int(parts.q.max()) <= 15
    for t in (parts.scales, parts.offsets):
        assert torch.equal(t.half().float(), t)
    back = parts.dequantize()
    step = parts.scales.repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    groups, got = w.view(6, 3, 32), back.view(6, 3, 32)
    torch.testing.assert_close(got.amin(-1), groups.amin(-1), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(got.amax(-1), groups.amax(-1), rtol=2e-3, atol=1e-6)
    assert torch.equal(back[2, 32:64], w[2, 32:64])


@needs_qgemm
def test_gguf_q4_requantizes_only_what_is_beyond_4_bits(ckpt):
    """'gguf-q4' (for a draft): every QLinear holds nibbles, the head's too (those it re-quantized
    with float16 scales); a tensor stored in 4 bits keeps the file's own blocks (the same packed
    bytes as under 'gguf'); logits near the 'none' model's. Catches a byte tensor left at 8 bits
    (no saving: the qwen2 file's tied Q8_0 head, its Q6_K and Q8_0 layers), a 4-bit one
    re-quantized (a needless loss: llama's Q4_K head), a scale or offset bug (~100%)."""
    arch, g, s = ckpt
    model = load_model(g, torch.float32, "gguf-q4")
    as_stored = load_model(g, torch.float32, "gguf")
    for layer in model.layers:
        for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2):
            for part in (m.parts if isinstance(m, ConcatLinear) else [m]):
                assert not isinstance(part, QLinear) or part.layout in (1, 3), part
    wo, wo_stored = model.layers[0].attention.wo, as_stored.layers[0].attention.wo  # Q4_1 in the file
    assert torch.equal(wo.weight, wo_stored.weight) and torch.equal(wo.scales, wo_stored.scales)
    # Q4_1 as stored (its float16 scales and offsets read as such), Q6_K re-quantized
    assert wo.layout == 3 and model.layers[0].feed_forward.w2.layout == 3 and "half" in wo.kind
    assert isinstance(model.output, QLinear) and model.output.layout in (1, 3)
    if as_stored.output.layout in (1, 3):  # 4-bit in the file
        assert torch.equal(model.output.weight, as_stored.output.weight)
    else:
        assert model.output.layout == 3
    tokens = _tokens(20)
    ref = _logits(load_model(g, torch.float32, "none"), tokens)
    err = (_logits(model, tokens) - ref).abs().max() / ref.abs().max()
    assert err < 0.3, err


@needs_int4
def test_int4_quantization_of_gguf_is_all_int4(ckpt):
    """Catches 'int4' on a GGUF file leaving non-4-bit tensors dense, or re-quantizing the
    4-bit ones (their weights must be the file's, to kernel precision)."""
    arch, g, s = ckpt
    model = load_model(g, torch.float32, "int4")
    for layer in model.layers:
        for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2):
            assert isinstance(m, Int4Linear), m
    expected = GGUFFile(g / "model.gguf").get("model.layers.0.self_attn.q_proj.weight")  # Q4_K, un-permuted
    got = model.layers[0].attention.wqkv.dequantized()[: expected.shape[0]]
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-2


def test_gguf_quantization_on_safetensors_is_refused(ckpt):
    """Catches 'gguf' silently serving a safetensors directory as float."""
    arch, g, s = ckpt
    with pytest.raises(ValueError, match="gguf.*safetensors"):
        load_model(s, torch.float32, "gguf")


# --- 4. lossless on GGUF weights -------------------------------------------------------


@pytest.mark.parametrize("draft_quant", [pytest.param("int4", marks=needs_int4), pytest.param("gguf-q4", marks=needs_qgemm)])
@pytest.mark.parametrize("mode", ["sd", "amusd"])
def test_speculative_equals_ar_on_gguf_weights(ckpt, mode, draft_quant):
    """Catches a verification pass on GGUF int4 weights that differs from ar's 1-token passes
    (e.g. a batched int4 kernel whose rows depend on each other, a ConcatLinear that mixes
    rows): greedy float32 sd/amusd output with a gguf target and an FR-Spec draft (int4, or
    gguf-q4: the file's other tensors re-quantized to 4 bits) must be token-identical to the
    target alone."""
    from protocol.messages import GenerateRequest, SamplingParams
    from configs.modes import mode_of
    from tests.local_draft import LocalTransport, random_steps
    from workers.engine import DraftEngine, DraftStream, NoDraft, PlainDraft, VerifyEngine

    arch, g, s = ckpt
    target = load_model(g, torch.float32, "gguf")
    draft_model = load_model(g, torch.float32, draft_quant, head_vocab=120)
    prompts = [[5, 17, 42], [200, 3, 3, 9, 1, 77, 299], [11], [8, 6, 4, 2, 0, 1, 3, 5, 7, 250, 251]]
    requests = [GenerateRequest(f"r{i}", p, 32, SamplingParams(), []) for i, p in enumerate(prompts)]

    def run(engine):
        for r in requests:
            engine.add(r)
        results, outputs = {}, []
        while engine.has_work:
            for out in engine.step():
                results.setdefault(out.request_id, []).extend(out.token_ids)
                outputs.append(out)
        return results, outputs

    ar, _ = run(VerifyEngine(target, NoDraft(), max_model_len=256, max_running=3))
    draft = DraftEngine(PlainDraft(draft_model), max_model_len=256, max_requests=3)
    source = DraftStream(
        LocalTransport(draft, random_steps(seed=4) if mode == "amusd" else None),
        num_draft_tokens=4, max_run_ahead=8, mode=mode_of(mode), timeout_s=60,
    )
    spec, outputs = run(VerifyEngine(target, source, max_model_len=256, max_running=3))
    for r in requests:
        assert len(ar[r.request_id]) == 32
        assert spec[r.request_id] == ar[r.request_id], r.request_id
    assert len({t for toks in ar.values() for t in toks}) > 5  # varied output
    assert sum(o.num_draft_tokens for o in outputs) > 0
    assert sum(o.num_accepted_tokens for o in outputs) > 0  # the draft did take part


# --- 5. SubsetHead / head_vocab --------------------------------------------------------


def test_subset_head_keeps_ids_and_added_tokens(ckpt):
    """Catches SubsetHead scattering logits to the wrong ids, leaving kept ids at -inf, not
    masking the rest, or dropping the tokenizer's added tokens (ids above N)."""
    arch, g, s = ckpt
    n = 64
    full = load_model(g, torch.float32, "none")
    sub = load_model(g, torch.float32, "none", head_vocab=n)
    assert isinstance(_unwrapped(sub.output), SubsetHead)
    kept = list(range(n)) + list(range(VOCAB - len(SPECIAL), VOCAB))
    assert _unwrapped(sub.output).ids.tolist() == kept
    tokens = _tokens(12, seed=5)
    a, b = _logits(full, tokens), _logits(sub, tokens)
    assert b.shape == a.shape == (12, VOCAB)
    torch.testing.assert_close(b[:, kept], a[:, kept], rtol=1e-5, atol=1e-5)
    mask = torch.ones(VOCAB, dtype=torch.bool)
    mask[kept] = False
    assert torch.isneginf(b[:, mask]).all()
    assert torch.isfinite(b[:, kept]).all()


@needs_qgemm
def test_gguf_subset_head_keeps_the_files_blocks(ckpt):
    """Under `gguf` a reduced draft head takes the file's own quantized rows through qgemm.
    Catches those rows de-quantized to a dense float32 matrix instead (the 0.5B draft's
    32,768-row head: 117 MB read a pass instead of 31), or rows picked from the wrong ids:
    kept logits equal the full qgemm head's."""
    arch, g, s = ckpt
    full = load_model(g, torch.float32, "gguf")
    sub = load_model(g, torch.float32, "gguf", head_vocab=64)
    assert isinstance(_unwrapped(full.output), QLinear), "the file's head should be quantized"
    head = _unwrapped(sub.output)
    assert isinstance(head.rows, QLinear) and head.rows.out_features == 64 + len(SPECIAL)
    tokens = _tokens(12, seed=7)
    a, b = _logits(full, tokens), _logits(sub, tokens)
    torch.testing.assert_close(b[:, head.ids], a[:, head.ids], rtol=1e-5, atol=1e-5)


@needs_int4
def test_int4_subset_head_of_odd_size(ckpt):
    """Catches an int4 reduced head failing to load when its row count (N + added tokens = 67)
    is no multiple of 16 (the CPU int4 packing's unit; 32768 + 22 added tokens is not either),
    or its rows going to the wrong ids: kept logits close to the float subset head's."""
    arch, g, s = ckpt
    dense = load_model(g, torch.float32, "int4", head_vocab=64)
    sub = load_model(g, torch.float32, "int4", head_quantization="int4", head_vocab=64)
    head = _unwrapped(sub.output)
    assert isinstance(head.rows, Int4Linear) and head.rows.out_features == 67
    tokens = _tokens(12, seed=6)
    a, b = _logits(dense, tokens), _logits(sub, tokens)
    kept = head.ids
    assert torch.isneginf(b).sum() == 12 * (VOCAB - 67)
    err = (b[:, kept] - a[:, kept]).abs().max() / a[:, kept].abs().max()
    assert err < 0.15, err  # int4 re-quantization of the head rows: coarse, but the same ids


def test_subset_vocabulary_added_tokens_and_range(ckpt):
    """Catches head_vocab out of range being accepted, and added tokens not read from
    tokenizer.json (or kept beyond the vocabulary)."""
    arch, g, s = ckpt
    assert subset_vocabulary(g, VOCAB, 10).tolist() == [*range(10), 297, 298, 299]
    assert subset_vocabulary(g, VOCAB, VOCAB).tolist() == list(range(VOCAB))
    assert subset_vocabulary(g, 298, 10).tolist() == [*range(10), 297]  # ids >= vocab_size dropped
    for bad in (-1, VOCAB + 1):
        with pytest.raises(ValueError, match="head_vocab"):
            load_model(g, torch.float32, "none", head_vocab=bad)


def test_config_refuses_target_head_vocab():
    """Catches a reduced head accepted for the target (its logits define the output: lossy)."""
    from configs.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="target.head_vocab"):
        load_config(target__head_vocab=100)
    with pytest.raises(ConfigError, match="draft.head_vocab"):
        load_config(draft__head_vocab=-1)
    assert load_config(draft__head_vocab=100).draft.head_vocab == 100


# --- 6. resolve_checkpoint of a real (tiny) GGUF file ----------------------------------


def test_resolve_checkpoint_of_tiny_gguf(tmp_path, monkeypatch):
    """Catches convert_gguf writing no config/tokenizer or no model.gguf link, or a cache dir
    that load_model cannot read: transformers reads this file's metadata and tokenizer."""
    from workers.model import load_tokenizer, resolve_checkpoint

    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    truth = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", "qwen2")
    path = resolve_checkpoint(str(tmp_path / "tiny-qwen2.gguf"), progress=lambda s: None)
    assert path.is_dir() and path != tmp_path
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    link = path / "model.gguf"
    assert link.is_symlink() and link.resolve() == (tmp_path / "tiny-qwen2.gguf").resolve()
    assert not list(path.glob("*.safetensors"))
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["vocab_size"]) == ("qwen2", DIM, VOCAB)
    tok = load_tokenizer(path)
    assert len(tok) == VOCAB and tok.eos_token_id == VOCAB - 1
    assert subset_vocabulary(path, VOCAB, 10).tolist()[-3:] == [297, 298, 299]
    model = load_model(path, torch.float32, "none")
    assert model.args.tie_embeddings and model.args.n_kv_heads == N_KV_HEADS
    torch.testing.assert_close(model.tok_embeddings.weight, truth["model.embed_tokens.weight"])


@needs_qgemm
def test_gguf_model_on_qgemm_is_batch_invariant(ckpt):
    """Catches any part of the forward (attention, a dense linear beside the qgemm ones, the
    head) whose rows depend on how many tokens the pass has: a 4-token pass must give, bit for
    bit, the logits of 4 one-token passes (what makes a verification equal ar's decode steps)."""
    arch, g, s = ckpt
    model = load_model(g, torch.float32, "gguf")
    tokens = _tokens(24)
    with torch.no_grad():
        one = model.new_cache(64)
        model.forward(tokens[:16], one)
        steps = torch.cat([model.forward(tokens[16 + i : 17 + i], one) for i in range(4)])
        many = model.new_cache(64)
        model.forward(tokens[:16], many)
        together = model.forward(tokens[16:20], many, num_logits=4)
    assert torch.equal(steps, together)
