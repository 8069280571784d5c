"""Message <-> ZeroMQ frames. Frame 0 is msgpack; arrays travel as raw frames.

Layout: [msgpack(message), msgpack([(dtype, shape), ...]), raw0, raw1, ...].
Nothing is ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import msgspec
import numpy as np

from protocol.messages import Message

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
_meta_decoder = msgspec.msgpack.Decoder(list[tuple[str, list[int]]])

# dtypes allowed on the wire; anything else is refused rather than guessed
_DTYPES = {"float32", "float16", "int64", "int32", "uint8"}


class DecodeError(ValueError):
    """A frame list that is not a well-formed Tandem message."""


@dataclass
class Decoded:
    message: Message
    arrays: list[np.ndarray] = field(default_factory=list)


def encode(message: Message, arrays: Sequence[np.ndarray] = ()) -> list[bytes | memoryview]:
    meta = []
    raws: list[memoryview] = []
    for array in arrays:
        array = np.ascontiguousarray(array)
        if array.dtype.name not in _DTYPES:
            raise TypeError(f"dtype {array.dtype} cannot go on the wire")
        meta.append((array.dtype.name, list(array.shape)))
        raws.append(memoryview(array).cast("B"))
    return [_encoder.encode(message), _encoder.encode(meta), *raws]


def decode(frames: Sequence[bytes | memoryview]) -> Decoded:
    if len(frames) < 2:
        raise DecodeError(f"expected at least 2 frames, got {len(frames)}")
    try:
        message = _decoder.decode(frames[0])
        meta = _meta_decoder.decode(frames[1])
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)) from exc
    raws = frames[2:]
    if len(meta) != len(raws):
        raise DecodeError(f"{len(meta)} array headers but {len(raws)} array frames")
    arrays = []
    for (dtype, shape), raw in zip(meta, raws):
        if dtype not in _DTYPES:
            raise DecodeError(f"dtype {dtype!r} is not allowed on the wire")
        if any(dim < 0 for dim in shape):
            raise DecodeError(f"negative dimension in array shape {shape}")
        try:  # np raises ValueError for a frame that is not whole items, an impossible shape, ...
            array = np.frombuffer(raw, dtype=dtype)
            fits = array.size == int(np.prod(shape, dtype=np.int64))
            array = array.reshape(shape) if fits else None
        except (ValueError, OverflowError) as exc:
            raise DecodeError(f"array frame does not hold {dtype} {shape}: {exc}") from exc
        if array is None:
            raise DecodeError(f"array frame does not fit shape {shape}")
        arrays.append(array)
    return Decoded(message, arrays)
