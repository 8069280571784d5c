"""How a tensor-parallel target is split: the split math, the config schema, and every
kind of weight (float, int4, GGUF blocks for qgemm) cut by rows and by columns, checked
by running the shards as threads against the single-process model (float32)."""

from __future__ import annotations

import pytest
import torch

from configs.loader import ConfigError, load_config
from tests.tiny_model import make_tiny_checkpoint
from tests.tp_threads import run_passes, shard_models
from workers.model import load_model
from workers.model.args import ModelArgs
from workers.model.linear import int4_available
from workers.model.qlinear import QLinear, machine_can_build
from workers.model.tensor_split import AllReduced, split_range, tensor_splits

PROMPT = torch.tensor([5, 17, 42, 9, 1, 3, 200, 77, 4, 8, 9, 10, 11, 12])
# a prefill longer than the row-wise limit (the masked path), decode steps, a rollback and a verification
PASSES = [(PROMPT[:10], 10), (PROMPT[10:11], 1), (PROMPT[11:12], 1), (PROMPT[12:14], 2)]


def args(n_heads=6, n_kv_heads=3, head_dim=16, intermediate=160) -> ModelArgs:
    return ModelArgs(vocab_size=256, dim=n_heads * head_dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                     head_dim=head_dim, intermediate_size=intermediate)


def single_process(model, capacity=64) -> list[torch.Tensor]:
    cache = model.new_cache(capacity)
    with torch.inference_mode():
        return [model.forward(tokens, cache, n) for tokens, n in PASSES]


# -- the split ---------------------------------------------------------------------


def test_split_range_is_even_aligned_and_covers_everything():
    """Catches uneven or overlapping shares, and a cut inside a quantization block."""
    assert split_range(3, 2) == [(0, 2), (2, 3)]
    assert split_range(8960, 2, 256) == [(0, 4608), (4608, 8960)]  # Qwen2.5-1.5B's MLP: 18 + 17 super-blocks
    assert split_range(1536, 4, 256) == [(0, 512), (512, 1024), (1024, 1280), (1280, 1536)]
    with pytest.raises(ValueError, match="multiple"):
        split_range(100, 2, 32)
    with pytest.raises(ValueError, match="cannot be split"):
        split_range(2, 3)


def test_tensor_splits_give_each_rank_its_heads_and_features():
    """Catches query heads not following their KV head, and a missing or doubled feature."""
    splits = tensor_splits(args(), 2)
    assert [(s.kv_lo, s.kv_hi) for s in splits] == [(0, 2), (2, 3)]
    assert [s.q_range for s in splits] == [(0, 64), (64, 96)]  # 2 query heads per KV head, 16 wide
    assert [s.kv_range for s in splits] == [(0, 32), (32, 48)]
    assert [(s.ffn_lo, s.ffn_hi) for s in splits] == [(0, 80), (80, 160)]
    assert splits[1].cut("model.layers.0.self_attn.o_proj.weight") == ("cols", 64, 96)
    assert splits[1].cut("model.layers.0.mlp.down_proj.bias") == ("bias", 0, 0)
    assert splits[1].cut("model.layers.0.input_layernorm.weight") is None


def test_splits_that_cannot_work_are_refused_with_the_reason():
    """Catches a TP degree above the KV heads, int8 (per-row scales), and int4 groups cut by a head boundary."""
    with pytest.raises(ValueError, match="3 KV heads cannot be split over 4"):
        tensor_splits(args(), 4)
    with pytest.raises(ValueError, match="int8"):
        tensor_splits(args(), 2, "int8")
    with pytest.raises(ValueError, match="int4 groups 32 inputs of o_proj"):
        tensor_splits(args(n_heads=3, n_kv_heads=3, head_dim=8), 2, "int4")  # o_proj cut at column 16
    assert tensor_splits(args(n_heads=4, n_kv_heads=2, head_dim=64, intermediate=512), 2, "gguf")[1].ffn_lo == 256


# -- the config ----------------------------------------------------------------------

TWO_CPUS = [{"device": "cpu", "threads": 1}, {"device": "cpu", "threads": 1}]


def test_a_list_of_target_devices_is_a_tensor_parallel_target(tmp_path):
    """Catches the list form not parsed, or the ranks' order lost (rank 0 first)."""
    config = load_config(
        None, placement__sd={"target": [{"device": "cpu", "cores": [0]}, {"device": "cpu", "cores": [1]}], "draft": {}}
    )
    assert [p.cores for p in config.placement_for("sd").targets] == [(0,), (1,)]
    assert len(config.placement_for("ar").targets) == 1


@pytest.mark.parametrize(
    "target, extra, message",
    [
        ([], {}, "empty list"),
        ([{"device": "cpu"}, {"device": "cuda:0"}], {}, "devices of one kind"),
        ([{"device": "cuda:0"}, {"device": "cuda:0"}], {}, "a GPU of its own"),
        (TWO_CPUS, {"target__quantization": "int8"}, "int8"),
        (TWO_CPUS, {"tensor_parallel__channel": "carrier-pigeon"}, "tensor_parallel.channel"),
    ],
)
def test_bad_tensor_parallel_configs_are_refused(target, extra, message):
    """Catches each mistake passing silently into a worker that would hang or compute garbage."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, placement__sd={"target": target}, **extra)


def test_cpu_tp2_config_puts_the_easyspec_draft_on_the_targets_devices():
    """The shipped configs/cpu-tp2.yaml: TP-2 over both cores, and in easyspec the draft's
    ranks on the same cores as the target's (EasySpec's own setting). Catches the file
    drifting from what the README says."""
    config = load_config("configs/cpu-tp2.yaml")
    for mode in ("ar", "sd", "easyspec"):
        assert [p.cores for p in config.placement_for(mode).targets] == [(0,), (1,)]
    easyspec = config.placement_for("easyspec")
    assert [p.cores for p in (easyspec.draft, *easyspec.draft_ranks)] == [p.cores for p in easyspec.targets]


# -- the shards against the whole model ----------------------------------------------


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """3 KV heads (2 + 1 over 2 ranks), q/k/v and o biases: the uneven split, biases added once."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tp-uneven"), n_layers=2, dim=96, n_heads=6, n_kv_heads=3,
        intermediate_size=160, vocab_size=256, seed=2, attention_bias=True,
    )


@pytest.mark.parametrize("world", [2, 3])
def test_float32_shards_equal_the_whole_model(uneven, world):
    """TP-2 and TP-3 logits allclose to the single-process model over a prefill, decode steps
    and a verification; catches a head or feature sliced wrong, a row-parallel bias added on
    every rank, a cache sized for all heads, or a missing all-reduce (2 per layer per pass)."""
    ref = single_process(load_model(uneven, dtype=torch.float32))
    models, reducer = shard_models(uneven, world)
    got = run_passes(models, PASSES)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert reducer.count == 2 * 2 * len(PASSES)
    assert all(isinstance(layer.attention.wo, AllReduced) and isinstance(layer.feed_forward.w2, AllReduced)
               for layer in models[0].layers)
    assert models[1].output is None  # a follower computes no logits
    assert sum(m.new_cache(8).k.shape[1] for m in models) == 3


@pytest.mark.skipif(not int4_available(), reason="this torch build has no CPU int4 kernel")
def test_int4_shards_equal_the_whole_int4_model(tmp_path):
    """int4 weights cut on their groups: catches a shard quantized over other groups than the
    whole model's (the results would differ by far more than rounding)."""
    path = make_tiny_checkpoint(tmp_path, n_layers=2, dim=128, n_heads=4, n_kv_heads=2, intermediate_size=256, seed=4)
    ref = single_process(load_model(path, dtype=torch.float32, quantization="int4"))
    got = run_passes(shard_models(path, 2, quantization="int4")[0], PASSES)
    # the CPU int4 kernel rounds each partial output to bf16 (~1% of the logits' range here);
    # int4 itself moves these logits by ~60% of their range
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02 * b.abs().max().item())
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.skipif(machine_can_build() is not None, reason=f"qgemm: {machine_can_build()}")
def test_gguf_shards_on_qgemm_equal_the_whole_model(tmp_path):
    """A GGUF file served as stored (Q4_K, Q4_0, Q4_1, Q5_0, Q6_K, Q8_0 via qgemm), every
    weight cut by rows or by columns: catches a scale, offset or super-block field sliced
    out of step with its weights (QuantParts.rows/columns)."""
    from tests.unit.test_gguf_weights import gguf_checkpoint

    g, _ = gguf_checkpoint(tmp_path, "qwen2")
    whole = load_model(g, torch.float32, "gguf")
    assert isinstance(whole.layers[0].feed_forward.w2, QLinear)  # the kernel serves it (Q6_K)
    ref = single_process(whole)
    models, _ = shard_models(g, 2, quantization="gguf")
    assert isinstance(models[1].layers[0].feed_forward.w2.inner, QLinear)
    got = run_passes(models, PASSES)
    # qgemm quantizes each activation row to int8 per 32 inputs: a rounding difference upstream
    # (the all-reduce's order) can flip a step, ~0.2-1.5% of the logits' range here (measured;
    # with unquantized activations the same attention kernels differ by 1e-6); a field sliced
    # wrong costs ~100%
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0.03 * b.abs().max().item())
