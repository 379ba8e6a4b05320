"""What the data plane checks in a frame's tensors before they reach the model, and how it refuses.

:func:`validated_tensors` holds a parsed frame against the stage's :class:`~graftfl.core.split.TensorSpec`
for its kind: the tensor names, wire dtypes, shapes (the batch within ``1..max_batch``, the same
in every tensor), finite values and labels within the classes. A failed check raises
:class:`FrameRejected` with the gRPC status code the stream ends with, whichever way the frame
came (a gRPC stream or an in-process one, :mod:`graftfl.transport.direct`).
"""

from __future__ import annotations

import math

import grpc
import torch

from graftfl.core.split import TensorSpec
from graftfl.transport.frames import FrameError, decode_tensors, wire_dtypes_of


class FrameRejected(Exception):
    """A frame the data plane refuses: the stream ends with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _invalid(message: str) -> FrameRejected:
    return FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, message)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite.

    A finite sum proves it (a NaN or an infinity in the tensor makes the sum NaN or infinite) at a
    third of the cost of a full elementwise check; a sum that overflows gets the full check. The
    sum is tested as a Python float: one torch call fewer (2.4 instead of 7 µs a frame).
    """
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


def validated_tensors(header: dict, raw: bytes, offset: int, specs: dict[str, TensorSpec], wire_dtype: str, max_batch: int) -> dict[str, torch.Tensor]:
    """The frame's tensors, once every one matches ``specs`` (floating ones in ``wire_dtype``); else :class:`FrameRejected`."""
    check_declared(header, specs, wire_dtype)
    try:
        tensors = decode_tensors(header, raw, offset)
    except FrameError as err:
        raise _invalid(str(err)) from err
    return checked_tensors(tensors, specs, max_batch)


def checked_delivered(header: dict, tensors: dict[str, torch.Tensor], specs: dict[str, TensorSpec], wire_dtype: str, max_batch: int) -> dict[str, torch.Tensor]:
    """:func:`validated_tensors` for a frame handed over in memory (``as_delivered``): its header and decoded tensors."""
    check_declared(header, specs, wire_dtype)
    return checked_tensors(tensors, specs, max_batch)


def check_declared(header: dict, specs: dict[str, TensorSpec], wire_dtype: str) -> None:
    """The header names the tensors of ``specs``, floating ones in ``wire_dtype`` and the others in int64."""
    dtypes = wire_dtypes_of(header)
    if set(dtypes) != set(specs):
        raise _invalid(f"frame '{header['kind']}' must carry tensors {sorted(specs)}, got {sorted(dtypes)}")
    for name, spec in specs.items():
        expected = wire_dtype if spec.floating else "int64"
        if dtypes[name] != expected:
            raise _invalid(f"tensor '{name}' has dtype {dtypes[name]}, expected {expected}")


def checked_tensors(tensors: dict[str, torch.Tensor], specs: dict[str, TensorSpec], max_batch: int) -> dict[str, torch.Tensor]:
    """``tensors`` (decoded, named as in ``specs``) once shapes, batch, finite values and labels hold."""
    batch = None
    for name, spec in specs.items():
        tensor = tensors[name]
        shape = tuple(tensor.shape)
        if spec.exact:
            ok = shape == spec.shape
        else:
            ok = len(shape) == 1 + len(spec.shape) and shape[1:] == spec.shape and 1 <= shape[0] <= max_batch
        if not ok:
            wanted = spec.shape if spec.exact else f"(1..{max_batch}, {', '.join(map(str, spec.shape))})"
            raise _invalid(f"tensor '{name}' has shape {shape}, expected {wanted}")
        if batch is not None and shape[0] != batch:
            raise _invalid(f"tensor '{name}' has batch {shape[0]}, other tensors have {batch}")
        batch = shape[0]
        if spec.floating and not all_finite(tensor):
            raise _invalid(f"tensor '{name}' contains NaN or infinite values")
        if spec.num_classes is not None and len(tensor) and (int(tensor.min()) < 0 or int(tensor.max()) >= spec.num_classes):
            raise _invalid(f"labels must lie in [0, {spec.num_classes}), got [{int(tensor.min())}, {int(tensor.max())}]")
    return tensors
