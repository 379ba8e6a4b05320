"""Tensors <-> bytes with the dtype on the wire, and byte counting.

A tensor travels as raw little-endian bytes plus its shape and wire dtype name;
``bfloat16`` has no NumPy type, so it is moved as its 16-bit pattern.
"""

from __future__ import annotations

import io
import json
import math
import struct
from typing import Iterable, Mapping

import numpy as np
import torch

FLOAT_WIRE_DTYPES = ("float32", "float16", "bfloat16")  # what activations/gradients may travel as (protocol.wire_dtype)
WIRE_DTYPES: dict[str, torch.dtype] = {
    **{name: getattr(torch, name) for name in FLOAT_WIRE_DTYPES},
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype for wire dtype ``name``; a clear error lists the valid names."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype '{name}'; valid: {sorted(WIRE_DTYPES)}")
    return WIRE_DTYPES[name]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a CPU, contiguous ``tensor`` (``bfloat16`` as its 16-bit pattern: NumPy has no such type)."""
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes()


def tensor_of_raw(data, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A writable tensor of ``shape`` and ``dtype`` from :func:`raw_bytes`'s bytes (the caller checked the length)."""
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(bytearray(data), dtype=storage).reshape(shape)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def tensor_to_bytes(tensor: torch.Tensor, dtype_name: str = "float32") -> bytes:
    """Raw bytes of ``tensor`` cast to the wire dtype ``dtype_name``."""
    return raw_bytes(tensor.detach().to("cpu", wire_dtype(dtype_name)).contiguous())


def tensor_from_bytes(data: bytes, shape: Iterable[int], dtype_name: str, out_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; raises ``ValueError`` if the size does not match."""
    dtype = wire_dtype(dtype_name)
    shape = tuple(int(d) for d in shape)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"payload has {len(data)} bytes, shape {shape} in {dtype_name} needs {expected}")
    tensor = tensor_of_raw(data, shape, dtype)
    return tensor.to(out_dtype) if out_dtype is not None and dtype.is_floating_point else tensor


_NPY_HEADERS: dict[bytes, tuple] = {}  # an .npy header -> (shape, Fortran order, dtype)
_NPY_HEADERS_KEPT = 4096


def npy_array(data: bytes) -> np.ndarray:
    """The array an ``.npy`` payload holds (what ``np.save`` writes), as a read-only view of ``data``.

    The values ``np.load(io.BytesIO(data), allow_pickle=False)`` returns, without its cost per
    call: numpy parses the header with a Python literal parser, about 30 us an array, and a
    model's headers are the same every round, so each distinct header is parsed once here.
    Object arrays (pickles) are refused, as ``allow_pickle=False`` refuses them; a payload that
    is not ``.npy`` (numpy would open a zip archive) or too short for its header's shape raises
    ``ValueError``.
    """
    view = memoryview(data)
    if bytes(view[:6]) != b"\x93NUMPY":  # not np.load's fallback: it opens a payload starting "PK" as a zip archive
        raise ValueError("not an .npy payload")
    if len(view) < 10 or view[6] not in (1, 2):
        return np.load(io.BytesIO(data), allow_pickle=False)  # another format version: numpy's own reader (or its error)
    length_bytes = 2 if view[6] == 1 else 4
    start = 8 + length_bytes + int.from_bytes(view[8 : 8 + length_bytes], "little")
    header = bytes(view[:start])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        parsed = read_header(stream)
        if parsed[2].hasobject:
            raise ValueError("the payload holds Python objects, which are never unpickled")
        if len(_NPY_HEADERS) >= _NPY_HEADERS_KEPT:
            _NPY_HEADERS.clear()
        _NPY_HEADERS[header] = parsed
    shape, fortran_order, dtype = parsed
    count = math.prod(shape)
    if len(view) - start < count * dtype.itemsize:
        raise ValueError(f"the payload has {len(view) - start} bytes of values, shape {shape} in {dtype} needs {count * dtype.itemsize}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return values.reshape(shape, order="F" if fortran_order else "C")


def nbytes_of_arrays(arrays: Mapping[str, np.ndarray] | Iterable[np.ndarray]) -> int:
    """Total payload bytes of a collection of NumPy arrays."""
    values = arrays.values() if isinstance(arrays, Mapping) else arrays
    return int(sum(np.asarray(a).nbytes for a in values))


def state_dict_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy a state dict into numpy arrays (detached, on CPU), e.g. for a Flower ArrayRecord."""
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in state.items()}


def numpy_to_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Copy numpy arrays back into a state dict of torch tensors (the inverse of :func:`state_dict_to_numpy`)."""
    return {name: torch.from_numpy(np.array(array, copy=True)) for name, array in arrays.items()}


def flatten_parameters(model: torch.nn.Module) -> torch.Tensor:
    """All trainable parameters as one flat vector (in ``named_parameters`` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assign_flat_parameters(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector (from :func:`flatten_parameters`) back into ``model``."""
    total = sum(param.numel() for param in model.parameters())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} values, model has {total} parameters")
    offset = 0
    with torch.no_grad():
        for param in model.parameters():
            count = param.numel()
            param.copy_(flat[offset : offset + count].view_as(param))
            offset += count


def json_prefixed(data: bytes, magic: bytes, max_length: int, what: str, noun: str,
                  error: type[ValueError] = ValueError) -> tuple[object, int]:
    """The JSON after ``magic`` and its big-endian u32 length in ``data``, and the offset of the byte after it.

    The data plane's frames and the split hand-off's training states start this way. A wrong
    magic, a length over ``max_length`` or past the end, or text that is not JSON (nesting too
    deep for the parser included) raises ``error``, naming ``what`` (the kind of data) and
    ``noun`` (its JSON part).
    """
    start = len(magic) + 4
    if len(data) < start or data[: len(magic)] != magic:
        raise error(f"not a graftfl {what} (bad magic)")
    (length,) = struct.unpack(">I", data[len(magic) : start])
    if length > max_length or start + length > len(data):
        raise error(f"{noun} length {length} is invalid")
    try:
        return json.loads(data[start : start + length]), start + length
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise error(f"{noun} is not JSON: {err}") from err
