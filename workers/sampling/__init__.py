"""Pure tensor functions of speculative decoding: warping, sampling, the acceptance rule.

No model code, no processes: tensors in, tensors out, randomness keyed by the
request's seed and the position (see randomness.py). Every decoding mode uses these.
"""

from workers.sampling.acceptance import Acceptance, accept_greedy, accept_sampled
from workers.sampling.processors import STAGES, Rows, process_logits, warp_with
from workers.sampling.randomness import race, race_noise
from workers.sampling.warping import logprobs_of, warp

__all__ = [
    "Acceptance",
    "accept_greedy",
    "accept_sampled",
    "logprobs_of",
    "warp",
    "warp_with",
    "process_logits",
    "Rows",
    "STAGES",
    "race",
    "race_noise",
]
