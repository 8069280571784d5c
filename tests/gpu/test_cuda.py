"""The CUDA paths, on a machine with a GPU (`make test-gpu`; deselected from `make test`).

The same contracts as on CPU: a model on the GPU computes what it computes on the CPU, a
ragged batch gives each request what it gets alone, and every mode served on the GPU
answers greedily what `ar` answers (float32), alone and under concurrent load.
One GPU: draft and target share it (two processes); the layer-parallel draft and the
tensor-parallel target need a GPU per rank and are not covered here.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from configs.modes import mode_of
from tests.helpers import greedy_chat_answers, launch_server, tiny_pair, write_config
from tests.tiny_model import make_tiny_checkpoint
from tests.unit.test_batching import batched_and_alone
from workers.model import load_model
from workers.model.model import ROW_WISE_MAX_T

pytestmark = pytest.mark.cuda

CUDA = {"device": "cuda:0", "threads": 1}
QUESTIONS = ["What is the capital of France?", "Count from one to ten.", "Name three colours."]
SPECULATIVE = ["sd", "amusd", "lookup", "sd+lookup"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cuda-tiny"), vocab_size=256, seed=0)


def _passes(model, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prefill, a decode step, a verification of 4 drafts: logits of each, on the CPU."""
    cache = model.new_cache(64)
    with torch.inference_mode():
        return [model.forward(t, cache, len(t)).float().cpu() for t in tokens]


@pytest.mark.parametrize(
    "dtype,quantization,rtol",
    # int4: the CPU kernel takes bf16 activations even in a float32 model, the GPU dequantizes
    # to float32 (measured on an H200: 1.2% of the logit range apart); a misread layout is ~100%.
    [("float32", "none", 1e-4), ("float32", "int8", 1e-3), ("float32", "int4", 3e-2), ("bfloat16", "none", 3e-2)],
)
def test_a_model_on_the_gpu_computes_what_it_computes_on_the_cpu(tiny_dir, dtype, quantization, rtol):
    """Catches a tensor left on the CPU (the rope tables, a cache, a quantized linear's scales),
    a CPU-only kernel on the GPU path, or an int4/int8 layout read differently on the GPU."""
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 256, (n,), generator=gen) for n in (20, 1, 5)]
    on = {dev: load_model(tiny_dir, dtype=getattr(torch, dtype), quantization=quantization, device=dev) for dev in ("cpu", "cuda:0")}
    assert on["cuda:0"].device.type == "cuda"
    cpu, gpu = _passes(on["cpu"], tokens), _passes(on["cuda:0"], tokens)
    for c, g in zip(cpu, gpu):
        span = float(c.max() - c.min())
        assert (c - g).abs().max() <= rtol * span, f"max |cpu - gpu| {(c - g).abs().max():.3g} of a range {span:.3g}"
        if rtol <= 1e-3:  # both sides float32 throughout
            assert torch.equal(c.argmax(-1), g.argmax(-1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_ragged_batch_on_the_gpu_gives_each_request_what_it_gets_alone(tiny_dir, dtype):
    """Different cache lengths, a decode token, a verification, a prefill chunk, in one pass.
    Catches rows attending to another request's cache on the GPU path. cuBLAS may pick another
    kernel for another row count, so equality is to float rounding (greedy tokens equal in
    float32), not bit for bit; the test prints which it was."""
    model = load_model(tiny_dir, dtype=getattr(torch, dtype), device="cuda:0")
    num_logits = [1, 5, 0, 2]
    got, want, batched, alone = batched_and_alone(model, [11, 0, 30, 4], [1, 5, ROW_WISE_MAX_T + 7, 3], num_logits, seed=1)
    tol = 1e-5 if dtype == "float32" else 3e-2
    bitwise = all(torch.equal(g, w) for g, w in zip(got, want))
    print(f"{dtype}: batched logits equal the solo ones {'bit for bit' if bitwise else 'to rounding'}")
    for g, w, n in zip(got, want, num_logits):
        assert g.shape == w.shape == (n, 256)
        if n:
            span = float(w.max() - w.min())
            assert (g - w).abs().max() <= tol * span
            if dtype == "float32":
                assert torch.equal(g.argmax(-1), w.argmax(-1))
    for a, b in zip(batched, alone):
        assert a.length == b.length


@pytest.fixture(scope="module")
def gpu_config(tmp_path_factory, tiny_target_dir):
    """Both workers on cuda:0, float32, an int8 draft of the target's weights."""
    return write_config(
        tmp_path_factory.mktemp("cuda-config") / "cuda.yaml",
        **tiny_pair(tiny_target_dir),
        placement={"default": {"target": CUDA, "draft": CUDA}},
    )


@pytest.fixture(scope="module")
def ar_answers(gpu_config):
    texts, _ = greedy_chat_answers(gpu_config, "ar", "tiny", QUESTIONS, max_tokens=24)
    assert all(texts)
    return texts


@pytest.mark.parametrize("mode", SPECULATIVE)
def test_every_mode_served_on_the_gpu_answers_what_ar_answers(gpu_config, ar_answers, mode):
    """Real server, workers on the GPU, OpenAI SDK. Catches drafts or verification rows
    computed on the wrong device, probabilities crossing devices wrongly, or an acceptance
    bug that only the GPU's numbers expose."""
    texts, stats = greedy_chat_answers(gpu_config, mode, "tiny", QUESTIONS, max_tokens=24)
    assert texts == ar_answers
    if mode_of(mode).drafts:  # a random model's text repeats too little for lookup drafts
        assert sum(s["num_accepted_tokens"] for s in stats) > 0


def test_a_cpu_draft_with_a_gpu_target_answers_what_ar_answers(tmp_path, tiny_target_dir, ar_answers):
    """amusd across device kinds: the draft on the host's cores, the target on the GPU.
    Catches tokens or probabilities that assume both workers on one device."""
    config = write_config(
        tmp_path / "mixed.yaml",
        **tiny_pair(tiny_target_dir),
        placement={"default": {"target": CUDA, "draft": {"device": "cpu", "threads": 1}}},
    )
    texts, stats = greedy_chat_answers(config, "amusd", "tiny", QUESTIONS, max_tokens=24)
    assert texts == ar_answers
    assert sum(s["num_accepted_tokens"] for s in stats) > 0


@pytest.mark.parametrize("mode", ["ar", "sd", "amusd"])
def test_concurrent_requests_on_the_gpu_equal_their_solo_runs(gpu_config, mode):
    """12 requests at once (greedy and seeded sampling) through batched GPU passes, each
    equal to the same request sent alone. Catches a batch mixing requests' rows or seeds."""
    import openai

    prompts = [f"Say something about the number {i}." for i in range(12)]

    def ask(sdk, i: int) -> str:
        sampled = i % 2 == 1
        reply = sdk.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=20,
            temperature=0.8 if sampled else 0, seed=100 + i if sampled else None,
        )
        return reply.choices[0].text

    with launch_server(gpu_config, "--dtype", "float32", mode=mode) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        solo = [ask(sdk, i) for i in range(len(prompts))]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(lambda i: ask(sdk, i), range(len(prompts))))
    assert together == solo
    assert len(set(solo)) > 1
