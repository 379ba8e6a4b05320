"""A training state (module and optimizer state dicts) <-> bytes, without pickle.

A split site hands its part's state to the next site at every turn (``protocol.handoff``):
``torch.save`` / ``torch.load(weights_only=True)`` took about 0.15 + 0.45 ms for LeNet's
bottom and its momentum, almost all of it torch's pure-Python restricted unpickler, at
every one of a run's turns. This format holds the same states in a JSON outline and the
tensors' raw bytes, and reads them with ``json`` and ``torch.frombuffer``: nothing in it
can name code to run.

Layout::

    b"GFS1" | u32 outline length (big-endian) | outline (UTF-8 JSON) | tensor bytes, in outline order

The outline is ``{"tree": node, "tensors": [{"dtype", "shape"}, ...]}``. A node is a JSON
scalar (None, bool, int, float, str) or an object with one tag: ``{"t": i}`` (tensor i),
``{"d": [[str key, node], ...]}`` (dict), ``{"i": [[int key, node], ...]}`` (dict with
integer keys, as an optimizer's ``state``), ``{"l": [...]}`` (list), ``{"u": [...]}``
(tuple). Everything is checked on the way in; a malformed state is a ``ValueError``.
"""

from __future__ import annotations

import json
import math
import struct

import torch

from graftfl.core.codec import json_prefixed, raw_bytes, tensor_of_raw

MAGIC = b"GFS1"
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_SCALARS = (type(None), bool, int, float, str)
MAX_OUTLINE_BYTES = 16 << 20


def pack_state(state) -> bytes:
    """``state`` (dicts with str or int keys, lists, tuples, tensors, scalars) as bytes; tensors go to the CPU."""
    tensors: list[torch.Tensor] = []
    outline = {"tree": _outline(state, tensors), "tensors": [{"dtype": _NAMES[t.dtype], "shape": list(t.shape)} for t in tensors]}
    text = json.dumps(outline, allow_nan=True).encode()
    return b"".join([MAGIC, struct.pack(">I", len(text)), text, *(raw_bytes(t) for t in tensors)])


def unpack_state(data: bytes):
    """Inverse of :func:`pack_state`: writable CPU tensors; ``ValueError`` for anything it did not write."""
    outline, offset = json_prefixed(data, MAGIC, MAX_OUTLINE_BYTES, "training state", "training state outline")
    if not isinstance(outline, dict) or not isinstance(outline.get("tensors"), list) or "tree" not in outline:
        raise ValueError("training state outline needs 'tree' and a 'tensors' list")
    tensors = []
    for entry in outline["tensors"]:
        tensor, offset = _tensor_at(data, offset, entry)
        tensors.append(tensor)
    if offset != len(data):
        raise ValueError(f"training state has {len(data) - offset} trailing bytes")
    try:
        return _tree(outline["tree"], tensors)
    except RecursionError as err:
        raise ValueError("training state is nested too deeply") from err


def _outline(node, tensors: list[torch.Tensor]):
    if isinstance(node, torch.Tensor):
        if node.dtype not in _NAMES:
            raise ValueError(f"cannot pack a tensor of dtype {node.dtype}; valid: {sorted(DTYPES)}")
        tensors.append(node.detach().to("cpu").contiguous())
        return {"t": len(tensors) - 1}
    if isinstance(node, dict):
        if all(isinstance(key, str) for key in node):
            return {"d": [[key, _outline(value, tensors)] for key, value in node.items()]}
        if all(type(key) is int for key in node):
            return {"i": [[key, _outline(value, tensors)] for key, value in node.items()]}
        raise ValueError(f"cannot pack a dict whose keys are not all str or all int: {list(node)[:5]}")
    if isinstance(node, (list, tuple)):
        return {"l" if isinstance(node, list) else "u": [_outline(value, tensors) for value in node]}
    if isinstance(node, _SCALARS):
        return node
    raise ValueError(f"cannot pack a {type(node).__name__} (tensors, dicts, lists, tuples and scalars only)")


def _tensor_at(data: bytes, offset: int, entry) -> tuple[torch.Tensor, int]:
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES or not isinstance(entry.get("shape"), list):
        raise ValueError(f"tensor entry needs a dtype of {sorted(DTYPES)} and a shape list, got {entry!r:.80}")
    shape = entry["shape"]
    if any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(f"tensor shape must hold non-negative integers, got {shape!r:.80}")
    dtype = DTYPES[entry["dtype"]]
    size = math.prod(shape) * dtype.itemsize
    if offset + size > len(data):
        raise ValueError(f"tensor ({shape}, {entry['dtype']}) runs past the end of the training state")
    return tensor_of_raw(data[offset : offset + size], tuple(shape), dtype), offset + size


def _tree(node, tensors: list[torch.Tensor]):
    if isinstance(node, _SCALARS):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"training state node must be a scalar or an object with one tag, got {node!r:.80}")
    (tag, value), = node.items()
    if tag == "t":
        if type(value) is not int or not 0 <= value < len(tensors):
            raise ValueError(f"training state names tensor {value!r:.20}, which it does not hold")
        return tensors[value]
    if tag in ("l", "u") and isinstance(value, list):
        items = [_tree(item, tensors) for item in value]
        return items if tag == "l" else tuple(items)
    if tag in ("d", "i") and isinstance(value, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in value):
        key_type = str if tag == "d" else int
        if not all(type(key) is key_type for key, _ in value):
            raise ValueError(f"training state dict '{tag}' has keys that are not {key_type.__name__}")
        return {key: _tree(item, tensors) for key, item in value}
    raise ValueError(f"training state node has an unknown tag or shape: {node!r:.80}")
