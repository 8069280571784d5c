"""What rank 0 tells the other ranks of a rank group: one struct per command.

Commands are msgspec structs (like protocol/), encoded as msgpack and carried
by the channel as int64 words: [byte length, the bytes packed 8 to a word].

    ForwardBatch([Forward(cache, start, tokens, ...), ...])
                                         draft: this rank's share of one pass over several
                                         requests' fuzzy/exact jobs
    Configure(groups, variant, ...)      draft: switch plans without restarting
    ShardForwardBatch([ShardForward(cache, start, tokens), ...])
                                         tensor-parallel target: this rank's heads and MLP
                                         slice, one pass over several requests
    NewCache(cache, capacity)            a KV cache twin per engine cache
    Call(function, args)                 run a named function on the rank (inspection)
    Barrier / Shutdown
"""

from __future__ import annotations

import msgspec
import numpy as np


class Forward(msgspec.Struct, tag=True, array_like=True):
    """One request's job in a draft pass (an element of ForwardBatch)."""

    cache_id: int
    start: int  # position of tokens[0]
    tokens: list[int]
    num_logits: int
    exact: bool  # layer by layer (every rank runs every layer) instead of the plan's parallel groups
    final_length: int  # the cache length after the pass
    split_head: bool  # every rank computes the logits of a vocabulary slice (else rank 0 alone)


class ShardForward(msgspec.Struct, tag=True, array_like=True):
    """A tensor-parallel target's pass: tokens at positions start.. (the follower's twin of
    the cache is cut to `start` first: a rollback needs no command of its own)."""

    cache_id: int
    start: int
    tokens: list[int]


class ForwardBatch(msgspec.Struct, tag=True, array_like=True):
    """A draft pass over several requests' jobs, each over its own cache twin."""

    passes: list[Forward]


class ShardForwardBatch(msgspec.Struct, tag=True, array_like=True):
    """A tensor-parallel target's pass over several requests (ragged), each over its own cache twin."""

    passes: list[ShardForward]


class NewCache(msgspec.Struct, tag=True, array_like=True):
    cache_id: int
    capacity: int


class Configure(msgspec.Struct, tag=True, array_like=True):
    group_widths: list[int]  # the layer plan: consecutive groups of this many layers
    variant: str
    split_head: bool


class Call(msgspec.Struct, tag=True, array_like=True):
    """Run `function` ("module:name", called as function(rank_state, *args)) on every
    follower, then meet at a barrier: for looking inside the ranks (tests, debugging)."""

    function: str
    args: list[int | str]


class Barrier(msgspec.Struct, tag=True, array_like=True):
    pass


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


Command = ForwardBatch | ShardForwardBatch | NewCache | Configure | Call | Barrier | Shutdown

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Command)


def pack(command: Command) -> np.ndarray:
    """A command as int64 words for the channel."""
    raw = _encoder.encode(command)
    words = np.zeros(1 + -(-len(raw) // 8), dtype=np.int64)
    words[0] = len(raw)
    words[1:].view(np.uint8)[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return words


def unpack(words) -> Command:
    words = np.asarray(words, dtype=np.int64)
    n = int(words[0])
    return _decoder.decode(words[1:].view(np.uint8)[:n].tobytes())


# what a pass's fields (tag, cache id, positions, flags) may take in a command, counted in tokens
PASS_OVERHEAD_TOKENS = 12


def max_words(max_tokens: int) -> int:
    """Words of the longest command: a batch of passes whose tokens plus PASS_OVERHEAD_TOKENS
    each come to max_tokens (msgpack: <= 5 bytes a token)."""
    return 1 + -(-(5 * max_tokens + 64) // 8)


def command_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """The passes (by index, in order) of each command of a batched pass, so that no command
    outgrows max_words(max_tokens): one command unless the tokens overflow it."""
    batches: list[list[int]] = []
    used = max_tokens
    for i, n in enumerate(lengths):
        cost = n + PASS_OVERHEAD_TOKENS
        if used + cost > max_tokens and (not batches or batches[-1]):
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += cost
    return batches
