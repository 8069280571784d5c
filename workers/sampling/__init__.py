"""Pure tensor functions of speculative decoding: warping, sampling, the acceptance rule.

No model code, no processes: tensors in, tensors out, randomness passed in
(uniforms keyed by position, see randomness.py). Every decoding mode uses these.
"""

from workers.sampling.acceptance import Acceptance, accept_greedy, accept_sampled
from workers.sampling.processors import STAGES, Rows, process_logits, warp_with
from workers.sampling.randomness import COIN, DRAFT, PICK, keyed_uniform, keyed_uniforms
from workers.sampling.warping import logprobs_of, sample, sample_from_uniform, warp

__all__ = [
    "Acceptance",
    "accept_greedy",
    "accept_sampled",
    "logprobs_of",
    "sample",
    "sample_from_uniform",
    "warp",
    "warp_with",
    "process_logits",
    "Rows",
    "STAGES",
    "keyed_uniform",
    "keyed_uniforms",
    "COIN",
    "PICK",
    "DRAFT",
]
