"""The valid values of config settings that name a choice, defined once.

The loader checks configs against them and the workers dispatch on them; this
module imports nothing, so the HTTP process can read it without torch.
"""

DTYPES = ("auto", "float32", "bfloat16", "float16")  # "auto": bfloat16 where the device computes it natively, else float32;
# float32 on a CPU for a model served from its GGUF blocks (workers/model/dtypes.py)
QUANTIZATIONS = ("none", "int8", "int4", "gguf", "gguf-q4")  # weight-only quantization of a model's linears ("gguf": as the
# file stores it; "gguf-q4": its 4-bit tensors as stored, the rest re-quantized to 4 bits, for a draft)
GGUF_QUANTIZATIONS = ("gguf", "gguf-q4")  # the QUANTIZATIONS that read a GGUF file's own blocks

# EasySpec (workers/easyspec)
VARIANTS = ("full", "attention")  # what a parallel group runs side by side: whole layers, or attentions only
CALIBRATION_POLICIES = ("every_round", "on_mismatch", "never")  # when fuzzy KV is recomputed exactly
CHANNELS = ("auto", "shm", "gloo", "nccl")  # how ranks exchange hidden states ("auto": shm on CPU, gloo when ranks span hosts, nccl on CUDA)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming the valid values if `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r} (use one of {', '.join(choices)})")
