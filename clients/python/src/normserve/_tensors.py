"""torch tensors to and from normserve.v1.Tensor: raw little-endian bytes, row-major, int64 shape."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from normserve.v1 import tensor_pb2

# Each dtype travels as its bits, viewed as the integer type of the same width, so that numpy
# can write them little-endian whatever this machine's byte order (bfloat16 has no numpy type).
_WIRE: dict[torch.dtype, tuple[tensor_pb2.DType, torch.dtype, str]] = {
    torch.float32: (tensor_pb2.FLOAT32, torch.int32, "<i4"),
    torch.float64: (tensor_pb2.FLOAT64, torch.int64, "<i8"),
    torch.float16: (tensor_pb2.FLOAT16, torch.int16, "<i2"),
    torch.bfloat16: (tensor_pb2.BFLOAT16, torch.int16, "<i2"),
}


def wire_array(t: torch.Tensor) -> np.ndarray:
    """The tensor's elements as the wire carries them, flat: little-endian, a view where this
    machine's order is already that."""
    _, bits, wire = wire_type(t)
    return t.detach().cpu().contiguous().view(bits).numpy().reshape(-1).astype(wire, copy=False)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as the wire carries them."""
    return wire_array(t).tobytes()


def tensor_head(t: torch.Tensor) -> tensor_pb2.Tensor:
    """Shape and dtype without data: the head of a streamed call."""
    dtype, _, _ = wire_type(t)
    return tensor_pb2.Tensor(shape=list(t.shape), dtype=dtype)


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    message = tensor_head(t)
    message.data = tensor_bytes(t)
    return message


def decode(message: tensor_pb2.Tensor) -> torch.Tensor:
    """A FLOAT32 tensor from a reply (the service answers every tensor in float32)."""
    return from_bytes(message.shape, message.data, message.dtype)


def from_bytes(shape: Sequence[int], data: bytes | bytearray, dtype: tensor_pb2.DType = tensor_pb2.FLOAT32) -> torch.Tensor:
    if dtype != tensor_pb2.FLOAT32:
        raise RuntimeError(f"normserve client: expected a FLOAT32 tensor in the reply, got {tensor_pb2.DType.Name(dtype)}")
    count = math.prod(shape)
    if len(data) != 4 * count:
        raise RuntimeError(f"normserve client: a reply tensor of shape {list(shape)} carried {len(data)} bytes, not {4 * count}")
    values = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(tuple(shape))
    # Shaped in numpy, so that torch sees a tensor of its own, not a view: autograd lets code such
    # as torchvision's ResNets (ReLU(inplace=True), out += identity) modify a custom Function's
    # output in place only when it is not a view.
    return torch.from_numpy(values)


def wire_type(t: torch.Tensor) -> tuple[tensor_pb2.DType, torch.dtype, str]:
    try:
        return _WIRE[t.dtype]
    except KeyError:
        accepted = ", ".join(str(d) for d in _WIRE)
        raise TypeError(f"normserve tensors are {accepted}; got {t.dtype}") from None
