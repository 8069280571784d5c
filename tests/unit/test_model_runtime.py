"""Our Llama-family runtime against transformers' forward, on tiny random models (float32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from workers.model import KVCache, LlamaModel, ModelArgs, load_model
from tests.tiny_model import make_tiny_checkpoint
from workers.model.linear import Int4Linear, Int8Linear, PackedLinear, int4_available, make_linear

ATOL = 1e-4


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _save_random_hf(model, directory, seed=0, scale=0.2):
    """Fill an HF model with deterministic, far-from-uniform random weights and save it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(directory)
    return directory


def _tiny_hf(directory, kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    if kind == "qwen2":  # q/k/v bias, no o bias, untied head
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
        return _save_random_hf(Qwen2ForCausalLM(cfg), directory)
    if kind == "llama3-rope":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        cfg = LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
        return _save_random_hf(LlamaForCausalLM(cfg), directory)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


VARIANTS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha": dict(n_heads=4, n_kv_heads=4),
    "mqa-bias": dict(n_heads=4, n_kv_heads=1, attention_bias=True),
}


@pytest.fixture(scope="module", params=[*VARIANTS, "qwen2", "llama3-rope"])
def variant_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param in VARIANTS:
        return make_tiny_checkpoint(d, seed=1, **VARIANTS[request.param])
    return _tiny_hf(d, request.param)


def _tokens(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- equality with transformers ----------------------------------------------------


def test_logits_match_transformers_prefill_and_incremental(variant_dir):
    ref = _hf_model(variant_dir)
    model = load_model(variant_dir, dtype=torch.float32)
    tokens = _tokens(22, model.args.vocab_size)
    with torch.no_grad():
        expected = ref(tokens[None]).logits[0]  # [22, V]
    cache = model.new_cache(64)
    got = [model.forward(tokens[:10], cache, num_logits=10)]
    steps = [1, 1, 3, 1, 3, 3]  # 1-token and 3-token incremental passes
    pos = 10
    for k in steps:
        got.append(model.forward(tokens[pos : pos + k], cache, num_logits=k))
        pos += k
    assert cache.length == pos == 22
    got = torch.cat(got)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the greedy choice is non-trivial: the model does not predict one token everywhere
    assert len(set(expected.argmax(-1).tolist())) > 3


def test_num_logits_returns_last_positions(tiny):
    model = load_model(tiny, dtype=torch.float32)
    tokens = _tokens(8, model.args.vocab_size)
    full = model.forward(tokens, model.new_cache(16), num_logits=8)
    last3 = model.forward(tokens, model.new_cache(16), num_logits=3)
    last1 = model.forward(tokens, model.new_cache(16))
    assert full.shape == (8, model.args.vocab_size) and last1.shape == (1, model.args.vocab_size)
    torch.testing.assert_close(last3, full[-3:])
    torch.testing.assert_close(last1, full[-1:])
    with pytest.raises(ValueError):
        model.forward(tokens, model.new_cache(16), num_logits=9)
    cache = model.new_cache(16)  # num_logits=0: a prefill that only fills the cache
    assert model.forward(tokens[:7], cache, num_logits=0).shape == (0, model.args.vocab_size)
    torch.testing.assert_close(model.forward(tokens[7:], cache), full[-1:])


def test_works_with_and_without_inference_mode(tiny):
    model = load_model(tiny, dtype=torch.float32)
    tokens = _tokens(5, model.args.vocab_size)
    plain = model.forward(tokens, model.new_cache(8))
    with torch.inference_mode():
        inf = model.forward(tokens, model.new_cache(8))
    with torch.no_grad():
        ng = model.forward(tokens, model.new_cache(8))
    assert not plain.requires_grad
    torch.testing.assert_close(plain, inf)
    torch.testing.assert_close(plain, ng)
    # a cache made under inference_mode can still be written outside it, and vice versa
    with torch.inference_mode():
        cache = model.new_cache(8)
        model.forward(tokens[:3], cache)
    model.forward(tokens[3:], cache)
    outside = model.new_cache(8)
    with torch.inference_mode():
        last = model.forward(tokens, outside)
    torch.testing.assert_close(last, plain)
    assert model.forward(tokens[0], model.new_cache(2)).shape == (1, model.args.vocab_size)  # a 0-d token id


def test_bf16_close_to_float32(tiny):
    f32 = load_model(tiny, dtype=torch.float32)
    bf16 = load_model(tiny, dtype=torch.bfloat16)
    tokens = _tokens(12, f32.args.vocab_size)
    a = f32.forward(tokens, f32.new_cache(16), num_logits=12)
    b = bf16.forward(tokens, bf16.new_cache(16), num_logits=12)
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


# --- KV cache ----------------------------------------------------------------------


def test_crop_then_forward_equals_fresh_cache(tiny):
    model = load_model(tiny, dtype=torch.float32)
    V = model.args.vocab_size
    prefix, wrong, right = _tokens(9, V, 1), _tokens(4, V, 2), _tokens(3, V, 3)
    cache = model.new_cache(32)
    model.forward(prefix, cache)
    model.forward(wrong, cache, num_logits=4)  # a rejected draft...
    model.forward(wrong[:1], cache)
    cache.crop(9)  # ...rolled back
    assert cache.length == 9
    got = model.forward(right, cache, num_logits=3)
    fresh = model.new_cache(32)
    expected = model.forward(torch.cat([prefix, right]), fresh, num_logits=3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert cache.length == fresh.length == 12


def test_cache_bounds(tiny):
    model = load_model(tiny, dtype=torch.float32)
    cache = model.new_cache(6)
    assert isinstance(cache, KVCache) and cache.capacity == 6 and cache.length == 0
    a = model.args
    assert cache.k.shape == (a.n_layers, a.n_kv_heads, 6, a.head_dim)
    model.forward(_tokens(4, a.vocab_size), cache)
    with pytest.raises(ValueError):
        model.forward(_tokens(3, a.vocab_size), cache)  # 4 + 3 > 6
    assert cache.length == 4  # a refused pass changes nothing
    with pytest.raises(ValueError):
        cache.crop(5)
    with pytest.raises(ValueError):
        cache.crop(-1)
    cache.crop(0)
    model.forward(_tokens(6, a.vocab_size), cache)
    assert cache.length == 6


# --- per-layer access (EasySpec) ---------------------------------------------------


def test_forward_is_built_from_public_pieces(tiny):
    model = load_model(tiny, dtype=torch.float32)
    tokens = _tokens(7, model.args.vocab_size)
    expected = model.forward(tokens, model.new_cache(16), num_logits=2)

    cache = model.new_cache(16)
    pos = model.positions(cache.length, len(tokens))
    h = model.embed(tokens)  # [T, dim]
    for i, layer in enumerate(model.layers):
        h = h + layer.attention_block(h, cache.layer(i), pos)
        h = h + layer.mlp_block(h)
    cache.advance(len(tokens))
    got = model.head(h, num_logits=2)
    torch.testing.assert_close(got, expected)
    assert cache.length == 7


# --- quantization ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 rows: past the int8 kernel's threshold
def test_int8_linear_matches_dequantized_reference(dtype, rows):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) * 0.1
    b = torch.randn(96, generator=gen) * 0.1
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    lin = Int8Linear(w, b, dtype, "cpu")
    assert lin.weight.dtype == torch.int8
    deq = lin.weight.float() * lin.scales.float()[:, None]
    step = w.abs().amax(1, keepdim=True) / 127
    # half a quantization step, plus the rounding of the scales to bf16
    assert ((deq - w).abs() <= step * 0.5 + w.abs() * 2**-8 + 1e-7).all()
    torch.testing.assert_close(lin.dequantized().float(), deq, atol=1e-2, rtol=1e-2)
    expected = F.linear(x.float(), deq, b)
    got = lin(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)


@pytest.mark.skipif(not int4_available(), reason="no int4 kernels in this torch build")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_dequantized_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen) * 0.1
    x = torch.randn(3, 64, generator=gen).to(dtype)
    lin = Int4Linear.quantize(w, None, dtype, "cpu")
    deq = lin.dequantized().float()
    group_range = (w.reshape(-1, lin.group_size).amax(1) - w.reshape(-1, lin.group_size).amin(1)).max()
    assert (deq - w).abs().max() <= group_range / 15 * 0.51 + 1e-2  # half a step (+ bf16 scale rounding)
    got = lin(x)
    assert got.dtype == dtype
    # on CPU the bf16 kernel runs float32 models too (the input is rounded to bf16)
    tol = 3e-2 if lin.kernel_dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(got.float(), F.linear(x.float(), deq), atol=tol, rtol=tol)


def test_packed_dense_linear_is_exact():
    w = torch.randn(80, 44) * 0.1  # a fan-in the float32 kernel does not take (not a multiple of 8)
    b = torch.randn(80) * 0.1
    x = torch.randn(3, 44)
    lin = make_linear(w, b, "none", torch.float32, "cpu")
    torch.testing.assert_close(lin(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    if isinstance(lin, PackedLinear):  # the oneDNN path where it is available
        assert lin.weight.is_mkldnn


# (min cosine, min top-1 agreement) with the float model; random tiny weights make int4 coarse
QUANT_BOUNDS = {"int8": (0.98, 0.8), "int4": (0.75, 0.5)}


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_close_to_float(tiny, quantization):
    if quantization == "int4" and not int4_available():
        pytest.skip("no int4 kernels in this torch build")
    ref = load_model(tiny, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        q = load_model(tiny, dtype=dtype, quantization=quantization)
        assert any(isinstance(m, (Int8Linear, Int4Linear)) for m in q.modules())
        tokens = _tokens(24, ref.args.vocab_size, seed=5)
        a = ref.forward(tokens, ref.new_cache(32), num_logits=24)
        b = q.forward(tokens, q.new_cache(32), num_logits=24)
        min_cos, min_top1 = QUANT_BOUNDS[quantization]
        assert F.cosine_similarity(a, b, dim=-1).min() > min_cos
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= min_top1
        # incremental decoding through the quantized kernels (1-row path) agrees with the prefill path
        cache = q.new_cache(32)
        q.forward(tokens[:20], cache)
        steps = torch.cat([q.forward(tokens[i : i + 1], cache) for i in range(20, 24)])
        assert F.cosine_similarity(steps, b[-4:], dim=-1).min() > 0.99


def test_head_quantization_option(tiny):
    m = load_model(tiny, dtype=torch.bfloat16, quantization="int8", head_quantization="int8")
    assert isinstance(m.output, Int8Linear)
    m = load_model(tiny, dtype=torch.bfloat16, quantization="int8")
    assert not isinstance(m.output, (Int8Linear, Int4Linear))
    with pytest.raises(ValueError, match="quantization"):
        load_model(tiny, quantization="int3")


# --- config parsing ----------------------------------------------------------------


def _config(**over):
    cfg = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    cfg.update(over)
    return cfg


def test_model_args_from_hf_config():
    a = ModelArgs.from_hf_config(_config(rope_theta=500000.0, tie_word_embeddings=True))
    assert (a.dim, a.n_heads, a.n_kv_heads, a.head_dim) == (64, 4, 2, 16)
    assert a.rope_theta == 500000.0 and a.tie_embeddings and a.rope_type == "default"
    b = ModelArgs.from_hf_config(_config(rope_parameters={"rope_type": "default", "rope_theta": 100000.0}))
    assert b.rope_theta == 100000.0
    q = ModelArgs.from_hf_config(_config(model_type="qwen2"))
    assert q.qkv_bias and not q.o_bias
    lin = ModelArgs.from_hf_config(_config(rope_scaling={"type": "linear", "factor": 2.0}))
    torch.testing.assert_close(lin.inv_freq() * 2, ModelArgs.from_hf_config(_config()).inv_freq())


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(model_type="gemma3"), "model_type"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope"),
        (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_model_args_refuses_what_we_do_not_implement(over, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf_config(_config(**over))


def test_sliding_window_caches_are_refused(tmp_path):
    d = make_tiny_checkpoint(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window=16)
    (d / "config.json").write_text(json.dumps(cfg))
    model = load_model(d, dtype=torch.float32)
    model.new_cache(16)
    with pytest.raises(ValueError, match="sliding"):
        model.new_cache(17)


# --- tiny checkpoints --------------------------------------------------------------


def test_make_tiny_checkpoint_is_deterministic_and_greedy_is_varied(tmp_path):
    a = load_model(make_tiny_checkpoint(tmp_path / "a", seed=3), dtype=torch.float32)
    b = load_model(make_tiny_checkpoint(tmp_path / "b", seed=3), dtype=torch.float32)
    c = load_model(make_tiny_checkpoint(tmp_path / "c", seed=4), dtype=torch.float32)
    assert torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)
    assert a.args.vocab_size == 256 and a.args.tie_embeddings
    # greedy decoding from a short prompt produces varied tokens
    cache = a.new_cache(40)
    logits = a.forward(torch.tensor([1, 2, 3]), cache)
    out = []
    for _ in range(30):
        t = logits.argmax(-1)
        out.append(t.item())
        logits = a.forward(t, cache)
    assert len(set(out)) >= 5, out


def test_make_tiny_checkpoint_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workers.model import load_tokenizer

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *"abcdefghij"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    d = make_tiny_checkpoint(tmp_path / "m", tokenizer_dir=tmp_path / "tok")
    tok = load_tokenizer(d)
    assert len(tok) == 13 and tok.eos_token_id == 2
    model = load_model(d, dtype=torch.float32)
    assert model.args.vocab_size == 13
    ids = torch.tensor(tok("a b c").input_ids)
    assert model.forward(ids, model.new_cache(8)).shape == (1, 13)


def test_llama_model_class_is_exported(tiny):
    assert isinstance(load_model(tiny, dtype=torch.float32), LlamaModel)
