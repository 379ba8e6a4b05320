"""Tensors <-> bytes with the dtype on the wire, and byte counting.

A tensor travels as raw little-endian bytes plus its shape and wire dtype name;
``bfloat16`` has no NumPy type, so it is moved as its 16-bit pattern.
"""

from __future__ import annotations

import math
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


def tensor_to_bytes(tensor: torch.Tensor, dtype_name: str = "float32") -> bytes:
    """Raw bytes of ``tensor`` cast to the wire dtype ``dtype_name``."""
    cast = tensor.detach().to("cpu", wire_dtype(dtype_name)).contiguous()
    if cast.dtype == torch.bfloat16:
        cast = cast.view(torch.int16)
    return cast.numpy().tobytes()


def tensor_from_bytes(data: bytes, shape: Iterable[int], dtype_name: str, out_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Inverse of :func:`tensor_to_bytes`; raises ``ValueError`` if the size does not match."""
    dtype = wire_dtype(dtype_name)
    shape = tuple(int(d) for d in shape)
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"payload has {len(data)} bytes, shape {shape} in {dtype_name} needs {expected}")
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(bytearray(data), dtype=storage).reshape(shape)
    if dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(out_dtype) if out_dtype is not None and dtype.is_floating_point else tensor


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
